"""``python -m gateway_guard.sim``: run the simulated GPU server with uvicorn (parse in ``main``, work in ``run``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import get_args

import uvicorn

from gateway_guard.sim.model import Mode, SimConfig
from gateway_guard.sim.server import build_sim_app

EXIT_OK = 0
EXIT_USAGE = 2
STARTUP_FAILURE = 3  # as uvicorn's own CLI
DEFAULT_PORT = 8081

DESCRIPTION = """\
A GPU-like OpenAI-compatible server for demos, tests and load tests of the guard.

It answers /v1/chat/completions, /v1/completions (stream and not, usage included), /v1/embeddings,
/v1/models, /health, /props, /slots, and /metrics with llama.cpp's names (llamacpp:requests_processing,
llamacpp:requests_deferred, llamacpp:tokens_predicted_total, llamacpp:prompt_tokens_total) plus
sim:max_concurrent_seen and sim:requests_abandoned_total. It also emulates Ollama's /api/chat,
/api/generate, /api/ps, /api/show and /api/tags (--no-ollama turns that off: Hermes probes /api/tags
and, when it answers, takes the server for Ollama and sends num_ctx).

Modes:
  generate  --slots requests decode at once, each at --tokens-per-second when alone and slower by
            --batch-slowdown per extra neighbour; more wait in an unbounded queue (requests_deferred).
            A reply is min(max_tokens, --max-output-tokens) tokens after a --ttft prefill.
  scripted  like generate, but a request offering Hermes Agent's kanban_complete tool is answered with a
            kanban_complete call, and the turn after its result with a short final text, so real
            Hermes kanban workers finish their cards. --steps K > 1 makes a card K tool turns
            (kanban_show, terminal `sleep --tool-seconds`, kanban_comment, ..., kanban_complete).
  zero      no delays and no slot limit: replies at once (for measuring a proxy's own overhead).
"""


def parse_args(argv: Sequence[str] | None) -> tuple[SimConfig, argparse.Namespace]:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(
        prog="python -m gateway_guard.sim", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to bind (default: %(default)s)")
    parser.add_argument("--mode", choices=get_args(Mode), default=defaults.mode, help="default: %(default)s")
    parser.add_argument("--model-id", default=defaults.model_id, help="the one model served (default: %(default)s)")
    parser.add_argument(
        "--slots", type=int, default=defaults.slots, help="requests decoded at once (default: %(default)s)"
    )
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=defaults.tokens_per_second,
        help="decode rate of a request alone in the batch (default: %(default)s)",
    )
    parser.add_argument(
        "--ttft",
        type=float,
        default=defaults.ttft,
        help="prefill seconds before the first token (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-slowdown",
        type=float,
        default=defaults.batch_slowdown,
        help="per-request slowdown per extra request decoding alongside (default: %(default)s)",
    )
    parser.add_argument(
        "--max-output-tokens",
        type=int,
        default=defaults.max_output_tokens,
        help="cap on tokens per reply; Hermes asks for 65536 (default: %(default)s)",
    )
    parser.add_argument(
        "--embedding-dim", type=int, default=defaults.embedding_dim, help="embedding size (default: %(default)s)"
    )
    parser.add_argument(
        "--context-length",
        type=int,
        default=defaults.context_length,
        help="context window reported and enforced; Hermes needs >= 64000 (default: %(default)s)",
    )
    parser.add_argument(
        "--ollama",
        action=argparse.BooleanOptionalAction,
        default=defaults.ollama,
        help="serve the Ollama API emulation (/api/*); --no-ollama answers 404 there, as llama.cpp does, so\n"
        "clients that probe /api/tags (Hermes) take the sim for llama.cpp (default: %(default)s)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help="scripted: tool-calling turns per card (kanban_show, terminal, kanban_comment, ..., kanban_complete\n"
        "last); a card then takes steps + 1 LLM calls (default: %(default)s)",
    )
    parser.add_argument(
        "--tool-seconds",
        type=float,
        default=defaults.tool_seconds,
        help="scripted: how long the terminal step sleeps (tool time, no GPU slot held) (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        config = SimConfig(
            model_id=args.model_id,
            mode=args.mode,
            slots=args.slots,
            tokens_per_second=args.tokens_per_second,
            ttft=args.ttft,
            batch_slowdown=args.batch_slowdown,
            max_output_tokens=args.max_output_tokens,
            embedding_dim=args.embedding_dim,
            context_length=args.context_length,
            ollama=args.ollama,
            steps=args.steps,
            tool_seconds=args.tool_seconds,
        )
    except ValueError as error:
        parser.error(str(error))
    return config, args


def run(config: SimConfig, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, log_level: str = "warning") -> int:
    server = uvicorn.Server(
        uvicorn.Config(build_sim_app(config), host=host, port=port, log_level=log_level, access_log=False, ws="none")
    )
    server.run()
    return EXIT_OK if server.started else STARTUP_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_args(argv)
    return run(config, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
