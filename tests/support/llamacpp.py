"""A real llama.cpp HTTP server (via the xllamacpp wheel) and the sim, each as its own process on 127.0.0.1.

Three parts:

* ``ensure_model(size)`` writes a random-weight llama GGUF with the ``gguf`` package (byte-level token list
  plus a few words, a simple chat template), cached under ``<repo>/.models/``.
* ``serve(...)`` runs llama.cpp's own server in this process until SIGTERM; ``python tests/support/llamacpp.py
  serve --model PATH --port P`` is how ``llamacpp_server()`` starts it, so the guard talks to it over a socket.
* ``llamacpp_server(...)`` and ``sim_server(...)`` start a server process on a free port, wait for ``/health``
  and stop that process (by its own PID) on exit.

Random weights write noise and hit EOS at random: send ``"ignore_eos": true`` to get exactly max_tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / ".models"
HOST = "127.0.0.1"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% endif %}\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>\n{% endif -%}"
)
WORDS = ("the", "a", "and", "of", "to", "in", "is", "it", "task", "done", "card", "work", "hello", "world")


@dataclass(frozen=True, kw_only=True)
class ModelSize:
    """Shape of a random llama model; ``context_length`` is the trained context llama.cpp reads."""

    name: str
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    context_length: int = 4096


SIZES = {
    "tiny": ModelSize(name="tiny", n_embd=64, n_ff=192, n_layer=2, n_head=4),
    "med": ModelSize(name="med", n_embd=512, n_ff=1536, n_layer=8, n_head=8),
}


def model_path(size: str) -> Path:
    return MODELS_DIR / f"random-llama-{size}.gguf"


def ensure_model(size: str = "tiny") -> Path:
    """Path of the cached random GGUF of this size, writing it first when missing."""
    if size not in SIZES:
        raise ValueError(f"model size {size!r} is not one of {sorted(SIZES)}")
    path = model_path(size)
    if not path.exists():
        write_random_llama_gguf(path, SIZES[size])
    return path


def _vocab() -> tuple[list[str], list[float], list[int]]:
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    tokens += ["\u2581" + w for w in WORDS]
    types += [gguf.TokenType.NORMAL] * len(WORDS)
    scores = [0.0] * 259 + [-float(i) for i in range(len(WORDS))]
    return tokens, scores, [int(t) for t in types]


def write_random_llama_gguf(path: Path, size: ModelSize, *, seed: int = 0) -> None:
    """Write a llama-architecture GGUF with normal(0, 0.02) F32 weights; atomic (temp file + rename)."""
    import gguf
    import numpy as np

    tokens, scores, types = _vocab()
    rng = np.random.default_rng(seed)

    def weights(*shape: int) -> Any:
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(f"random-llama-{size.name}")
    writer.add_context_length(size.context_length)
    writer.add_embedding_length(size.n_embd)
    writer.add_block_count(size.n_layer)
    writer.add_feed_forward_length(size.n_ff)
    writer.add_head_count(size.n_head)
    writer.add_head_count_kv(size.n_head)
    writer.add_rope_dimension_count(size.n_embd // size.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    # numpy shapes are GGUF shapes reversed: token_embd is ne {n_embd, n_vocab}.
    e, ff, v = size.n_embd, size.n_ff, len(tokens)
    writer.add_tensor("token_embd.weight", weights(v, e))
    writer.add_tensor("output_norm.weight", np.ones(e, dtype=np.float32))
    writer.add_tensor("output.weight", weights(v, e))
    for i in range(size.n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(e, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", weights(e, e))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(e, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(ff, e))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(ff, e))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(e, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)


DEFAULT_THREADS = 1  # see serve()


def serve(
    model: Path, *, host: str = HOST, port: int, slots: int = 4, ctx: int = 4096, threads: int = DEFAULT_THREADS
) -> None:
    """Run llama.cpp's HTTP server in this process (metrics, slots, props on) until SIGTERM or SIGINT.

    ``ctx`` is the server's whole KV context (llama-server ``-c``), shared by the ``slots``.
    ``threads`` defaults to 1: on these 2-core machines, with the guard, a load generator or other tests
    running beside it, 2 threads (spin-waiting at each barrier) fell from ~125 to 7-9 tokens/s on "med"
    single-stream, measured back to back; pass 2 only on an otherwise idle machine.
    """
    import xllamacpp as xlc

    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the server's threads start, so they inherit it
    params = xlc.CommonParams()
    params.model.path = str(model)
    params.hostnames = [host]
    params.port = port
    params.n_parallel = slots
    params.n_ctx = ctx
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.endpoint_metrics = True
    params.endpoint_slots = True
    params.endpoint_props = True
    server = xlc.Server(params)
    signal.sigwait(stop)
    del server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class ServerStartError(RuntimeError):
    """A server process exited or stayed unhealthy; the message carries the tail of its log."""


def _log_tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read()[-3000:].decode(errors="replace")


@contextlib.contextmanager
def server_process(argv: Sequence[str], base_url: str, *, startup_timeout: float = 30.0) -> Iterator[str]:
    """Start ``argv`` in the repo root, wait for ``base_url/health`` to answer 200, yield ``base_url``.

    On exit the process (this one only, by its PID) gets SIGTERM, then SIGKILL after 5 s.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, base_url, startup_timeout, log)
            yield base_url
        finally:
            stop_process(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], base_url: str, timeout: float, log: IO[bytes]) -> None:
    wait_healthy(proc, f"{base_url}/health", timeout, lambda: _log_tail(log))


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float, tail: Callable[[], str]) -> None:
    """Until ``GET url`` answers 200; ``ServerStartError`` with ``tail()`` (its log) if the process exits first
    or ``timeout`` s pass. Polls: it is another process, there is no event to wait on."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerStartError(f"{proc.args!r} exited with {proc.returncode}:\n{tail()}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(url).status_code == 200:
                    return
            time.sleep(0.05)
    raise ServerStartError(f"{url} not 200 after {timeout} s:\n{tail()}")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """This process only, by its PID: SIGTERM, then SIGKILL after ``grace`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def llamacpp_server(
    model: str | Path = "tiny", *, slots: int = 4, ctx: int = 4096, threads: int = DEFAULT_THREADS
) -> Iterator[str]:
    """A real llama.cpp server process on a free 127.0.0.1 port; yields its base URL (no ``/v1``).

    ``model`` is a size name from ``SIZES`` (generated and cached on first use) or a GGUF path.
    """
    path = ensure_model(model) if isinstance(model, str) and model in SIZES else Path(model)
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "serve", "--model", str(path), "--port", str(port)]
    argv += ["--slots", str(slots), "--ctx", str(ctx), "--threads", str(threads)]
    with server_process(argv, f"http://{HOST}:{port}") as url:
        yield url


@contextlib.contextmanager
def sim_server(**config: Any) -> Iterator[str]:
    """``python -m gateway_guard.sim`` as a process on a free port; yields its base URL.

    Keywords are the sim's CLI options with ``_`` for ``-``, e.g. ``sim_server(slots=2, mode="zero",
    tokens_per_second=200)``; ``True`` passes a bare flag.
    """
    port = free_port()
    argv = [sys.executable, "-m", "gateway_guard.sim", "--host", HOST, "--port", str(port)]
    for key, value in config.items():
        if value is False or value is None:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    with server_process(argv, f"http://{HOST}:{port}") as url:
        yield url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("model", help="write (if missing) the random GGUF of a size and print its path")
    gen.add_argument("--size", choices=sorted(SIZES), default="tiny")
    srv = sub.add_parser("serve", help="run llama.cpp's HTTP server in the foreground until SIGTERM")
    srv.add_argument("--model", required=True, help="GGUF path, or a size name: " + ", ".join(SIZES))
    srv.add_argument("--host", default=HOST)
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--slots", type=int, default=4, help="parallel sequences (llama-server -np)")
    srv.add_argument("--ctx", type=int, default=4096, help="whole KV context shared by the slots (-c)")
    srv.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="CPU threads (-t); see serve()")
    args = parser.parse_args(argv)
    if args.command == "model":
        print(ensure_model(args.size))
        return 0
    model = ensure_model(args.model) if args.model in SIZES else Path(args.model)
    serve(model, host=args.host, port=args.port, slots=args.slots, ctx=args.ctx, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
