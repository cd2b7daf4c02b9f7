// gateway_guard status page: draws the same markup as app/page_render.py from /guard/capacity and /guard/history.
// Live through /guard/events (SSE, "event: capacity") when it answers, else by polling /guard/capacity
// once a second. No framework, no build step, nothing loaded from elsewhere.
(function () {
  "use strict";
  var CHART_W = 360, CHART_H = 100, CHART_MIN_SPAN = 300;
  var cap = null, capAt = 0, hist = null, pollTimer = null, shown = "", sinceSeen = {};

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function fmt(v) {
    if (v === null || v === undefined) return "none";
    if (v === true) return "yes";
    if (v === false) return "no";
    return String(v);
  }
  function k(path) { return esc(JSON.stringify(path)); }
  function num(path, v) { return '<b data-k="' + k(path) + '">' + esc(fmt(v)) + "</b>"; }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function utc(t) {
    if (typeof t !== "number") return "\u2014";
    var d = new Date(t * 1000);
    var iso = d.toISOString().slice(0, 19) + "Z";
    return '<time datetime="' + iso + '">' + pad(d.getUTCHours()) + ":" + pad(d.getUTCMinutes()) + ":" +
      pad(d.getUTCSeconds()) + " UTC</time>";
  }
  function f2(v) { return v.toFixed(2); }

  function bar(label, inFlight, queued, limit, scale, capAt) {
    scale = Math.max(scale || 0, limit || 0, inFlight + queued, 1);
    function x(v) { return f2(100 * v / scale); }
    var noCap = limit === null || limit === undefined;
    var name = label + " " + inFlight + (noCap ? "" : " of " + limit) + " in flight" +
      (queued ? ", " + queued + " queued" : "") + (noCap ? " (no cap of its own)" : "");
    var parts = ['<rect class="room" x="0" y="0" width="' + x(limit || scale) + '" height="10"/>'];
    if (capAt !== null && capAt !== undefined && limit !== null && capAt < limit) {
      parts.push('<rect class="headroom" x="' + x(capAt) + '" y="0" width="' + x(limit - capAt) + '" height="10"/>');
    }
    parts.push('<rect class="inflight" x="0" y="0" width="' + x(inFlight) + '" height="10"/>');
    parts.push('<rect class="queued" x="' + x(inFlight) + '" y="0" width="' + x(queued) + '" height="10"/>');
    return '<svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none" role="meter" aria-label="' +
      esc(name) + '" aria-valuemin="0" aria-valuemax="' + (limit || scale) + '" aria-valuenow="' + inFlight + '">' +
      parts.join("") + "</svg>";
  }

  // (state, its path, since as Unix seconds, detail, its path): the capacity view's state when it has one
  // ("state_since_s" seconds ago, kept steady between updates), else the history's.
  function upstreamState(name, up, h) {
    var p = ["c", "upstreams", name];
    if (typeof up.state === "string") {
      var since = null;
      if (typeof up.state_since_s === "number") {
        since = capAt - up.state_since_s;  // seconds ago when the view was received
        var seen = sinceSeen[name];
        if (seen && seen.state === up.state && Math.abs(seen.at - since) < 3) since = seen.at;
        else sinceSeen[name] = { state: up.state, at: since };
      }
      return [up.state, p.concat(["state"]), since, up.state_detail, p.concat(["state_detail"])];
    }
    var hu = ((h && h.upstreams) || {})[name];
    if (!hu) return ["unknown", null, null, null, null];  // not sampled yet
    var hp = ["h", "upstreams", name];
    return [hu.state, hp.concat(["state"]), hu.since, hu.detail, hp.concat(["detail"])];
  }

  function chart(name, points, now, windowS) {
    var top = 1;
    points.forEach(function (p) { top = Math.max(top, p[3], p[1], p[2]); });
    var first = points.length ? points[0][0] : now;
    var span = Math.min(windowS, Math.max(CHART_MIN_SPAN, now - first));
    var drawn = points.length ? points.concat([[now].concat(points[points.length - 1].slice(1))]) : [];
    function line(i) {  // the last step lasts until now
      return drawn.map(function (p) {
        var x = (p[0] - (now - span)) / span * CHART_W;
        return Math.max(0, x).toFixed(1) + "," + (CHART_H - p[i] / top * (CHART_H - 4)).toFixed(1);
      }).join(" ");
    }
    var lines = [[3, "limit"], [2, "queued"], [1, "inflight"]].map(function (a) {
      return '<polyline class="' + a[1] + '" points="' + line(a[0]) + '"/>';
    }).join("");
    var when = span >= windowS ? "last hour" : "since " + utc(first);
    return '<figure class="chart"><svg viewBox="0 0 ' + CHART_W + " " + CHART_H +
      '" preserveAspectRatio="none" role="img" aria-label="' + esc(name) +
      ': in flight, queued and limit over the last hour">' + lines + "</svg>" +
      '<figcaption><span class="key inflight">in flight</span> <span class="key queued">queued</span>' +
      ' <span class="key limit">limit</span> \u00b7 ' + when + ", top " + esc(fmt(top)) + "</figcaption></figure>";
  }

  function counts(p, v) {
    var queued = " \u00b7 " + num(p.concat(["queued"]), v.queued) + " queued";
    if (v.limit === null || v.limit === undefined) {  // a profile with no cap of its own
      return num(p.concat(["in_flight"]), v.in_flight) + " in flight" + queued + " \u00b7 no cap of its own";
    }
    return num(p.concat(["in_flight"]), v.in_flight) + " of " + num(p.concat(["limit"]), v.limit) + " in flight" +
      queued + " \u00b7 " + num(p.concat(["free"]), v.free) + " free";
  }

  function views(title, name, kind, vs, scale) {
    var rows = Object.keys(vs || {}).map(function (key) {
      var v = vs[key], p = ["c", "upstreams", name, kind, key];
      var label = kind === "lanes" ? key : "profile " + key;
      return '<li><span class="name">' + esc(key) + "</span>" + bar(label, v.in_flight, v.queued, v.limit, scale) +
        '<span class="nums">' + counts(p, v) + "</span></li>";
    });
    return rows.length ? "<h3>" + title + '</h3><ul class="views">' + rows.join("") + "</ul>" : "";
  }

  function reserved(p, r) {  // reservations (guard-dispatch's booked slots), when there are any
    if (!r || (typeof r === "object" && !Object.keys(r).some(function (key) { return r[key]; }))) return "";
    if (typeof r === "object" && !Array.isArray(r)) {
      var items = Object.keys(r).filter(function (key) { return typeof r[key] !== "object" || r[key] === null; })
        .map(function (key) { return "<li>" + esc(key) + ": " + num(p.concat(["reserved", key]), r[key]) + "</li>"; });
      return '<h3>reserved</h3><ul class="reserved">' + items.join("") + "</ul>";
    }
    return '<p class="reserved">reserved ' + num(p.concat(["reserved"]), r) + "</p>";
  }

  function renderUpstream(name, up, h) {
    var p = ["c", "upstreams", name];
    var st = upstreamState(name, up, h);
    var hu = ((h && h.upstreams) || {})[name] || {};
    var limit = up.limit;
    var batch = (up.lanes || {}).batch;
    var capAt = batch && batch.limit !== null && batch.limit !== undefined ? batch.limit : null;
    var out = ['<section class="upstream" data-upstream="' + esc(name) + '"><h2>' + esc(name) +
      ' <span class="state ' + esc(st[0]) + '"' + (st[1] ? ' data-k="' + k(st[1]) + '"' : "") + ">" +
      esc(st[0]) + "</span>" +
      " <small>since " + utc(st[2]) + "</small></h2>"];
    if (st[3]) out.push('<p class="detail" data-k="' + k(st[4]) + '">' + esc(st[3]) + "</p>");
    if (up.held !== null && up.held !== undefined) {  // the upstream is not up: requests wait in their lanes
      out.push('<p class="held">held ' + num(p.concat(["held"]), up.held) + ": requests wait until it is back</p>");
    }
    out.push('<p class="summary">limit ' + num(p.concat(["limit"]), limit) +
      ' (<span data-k="' + k(p.concat(["limit_reason"])) + '">' + esc(fmt(up.limit_reason)) + "</span>)" +
      " \u00b7 " + num(p.concat(["in_flight"]), up.in_flight) + " in flight \u00b7 " +
      num(p.concat(["queued"]), up.queued) + " queued \u00b7 " + num(p.concat(["free"]), up.free) + " free</p>");
    out.push(bar("all lanes", up.in_flight, up.queued, limit, limit, capAt));
    if (batch) {
      var lp = p.concat(["lanes", "batch"]);
      out.push('<p class="batch">free batch slots ' + num(lp.concat(["free"]), batch.free) +
        " (batch may hold " + num(lp.concat(["limit"]), batch.limit) + " of " + num(p.concat(["limit"]), limit) + ")</p>");
    }
    out.push(views("lanes", name, "lanes", up.lanes, limit));
    out.push(views("profiles", name, "profiles", up.profiles, limit));
    if (up.max_context_tokens !== null && up.max_context_tokens !== undefined) {
      out.push('<p class="tokens">context tokens in flight ' + num(p.concat(["tokens_in_flight"]), up.tokens_in_flight) +
        " of " + num(p.concat(["max_context_tokens"]), up.max_context_tokens) + "</p>");
    }
    out.push(reserved(p, up.reserved));
    var moves = up.limit_history || [];
    if (moves.length) {
      out.push('<h3>limit moves</h3><ul class="moves">' + moves.map(function (m, i) {
        var mp = p.concat(["limit_history", String(i)]);
        return "<li>" + utc(Math.round(capAt - m.ago_s)) + ": limit " + num(mp.concat(["limit"]), m.limit) +
          ' (<span data-k="' + k(mp.concat(["reason"])) + '">' + esc(fmt(m.reason)) + "</span>)</li>";
      }).join("") + "</ul>");
    }
    out.push(chart(name, hu.points || [], (h && h.now) || 0, (h && h.window_s) || 3600));
    out.push("</section>");
    return out.join("");
  }

  function renderRefusals(h) {
    var rows = ((h && h.refusals) || []).map(function (r, i) {
      var p = ["h", "refusals", String(i)];
      return "<tr><td>" + utc(r.at) + "</td>" + ["status", "lane", "profile", "upstream", "reason"].map(function (key) {
        return '<td data-k="' + k(p.concat([key])) + '">' + esc(fmt(r[key])) + "</td>";
      }).join("") + "</tr>";
    });
    if (!rows.length) return '<p class="empty">No refusals since the guard started.</p>';
    var head = "<tr><th>when</th><th>status</th><th>lane</th><th>profile</th><th>upstream</th><th>reason</th></tr>";
    return '<div class="scroll"><table class="refusals"><thead>' + head + "</thead><tbody>" + rows.join("") +
      "</tbody></table></div>";
  }

  function renderTokens(h) {
    var tpm = (h && h.tokens_per_minute) || {};
    var names = Object.keys(tpm);
    if (!names.length) return '<p class="empty">No tokens in the last minute.</p>';
    return '<table class="tpm"><thead><tr><th>profile</th><th>tokens / min</th></tr></thead><tbody>' +
      names.map(function (n) {
        return "<tr><td>" + esc(n) + "</td><td>" + num(["h", "tokens_per_minute", n], tpm[n]) + "</td></tr>";
      }).join("") + "</tbody></table>";
  }

  function render() {
    if (!cap) return;
    var ups = Object.keys(cap.upstreams || {}).map(function (n) { return renderUpstream(n, cap.upstreams[n], hist); });
    var html = '<p class="overall">free batch slots overall ' + num(["c", "free"], cap.free) +
      " \u00b7 snapshot at " + utc(hist ? hist.now : null) + "</p>" + ups.join("") +
      '<section class="recent"><h2>Last refusals</h2>' + renderRefusals(hist) + "</section>" +
      '<section class="recent"><h2>Tokens per minute</h2>' + renderTokens(hist) + "</section>";
    if (html !== shown) {  // redraw only what changed: a reader's place and selection survive idle updates
      document.getElementById("live").innerHTML = html;
      shown = html;
    }
  }

  function setMode(text, ok) {
    var el = document.getElementById("mode");
    el.textContent = text;
    el.className = "mode " + (ok ? "ok" : "stale");
  }

  function getJSON(url) {
    return fetch(url, { cache: "no-store", credentials: "same-origin" }).then(function (r) {
      if (!r.ok) throw new Error(url + " answered " + r.status);
      return r.json();
    });
  }

  function pollCapacity() {
    getJSON("capacity").then(function (c) {
      cap = c; capAt = Date.now() / 1000; setMode("live \u00b7 polling", true); render();
    }).catch(function () { setMode("guard unreachable", false); });
  }
  function startPolling() {
    if (pollTimer === null) { pollTimer = setInterval(pollCapacity, 1000); pollCapacity(); }
  }
  function stopPolling() {
    if (pollTimer !== null) { clearInterval(pollTimer); pollTimer = null; }
  }

  function startEvents() {
    if (!window.EventSource) { startPolling(); return; }
    var es = new EventSource("events");
    es.addEventListener("open", function () { stopPolling(); setMode("live \u00b7 events", true); });
    es.addEventListener("capacity", function (e) {
      try { cap = JSON.parse(e.data); capAt = Date.now() / 1000; } catch (err) { return; }
      setMode("live \u00b7 events", true); render();
    });
    es.addEventListener("error", function () {
      startPolling();  // no events endpoint (404), or the stream dropped: poll until it is back
      if (es.readyState === EventSource.CLOSED) setTimeout(startEvents, 30000);
    });
  }

  function pollHistory() {
    getJSON("history").then(function (h) { hist = h; render(); }).catch(function () { /* the capacity poll says */ });
  }

  function start() {
    pollHistory();
    setInterval(pollHistory, 2000);
    startPolling();  // at once; an open event stream stops it
    startEvents();  // (the stream sends on change only, so a quiet one is not a dead one: its errors say that)
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
