#!/usr/bin/env bash
# The "capped dispatch" script from the article "Kanban in Hermes Agent for Self Hosted LLM Workflows"
# (Codcompass team; the copy read for this project: ../shared/seeds/002_ff0ff8bc7801fe8c.txt, lines 272-303),
# reproduced unchanged below this header as the baseline of benchmarks/closed_loop.py, variant (a).
# On Hermes 0.19.0 `--max` caps the board's running cards, not one pass's spawns (see docs/dispatch.md),
# so this script keeps fewer cards running than MAX_PARALLEL; that is the behaviour being measured.
set -euo pipefail

MAX_PARALLEL="${MAX_PARALLEL:-2}"
BOARD="${BOARD:-}"

board_args=()
if [[ -n "$BOARD" ]]; then
  board_args=(--board "$BOARD")
fi

# or where your hermes is installed
export PATH="/home/abc/.local/bin:$PATH"

running_out="$(hermes kanban "${board_args[@]}" list --status running)"

if [[ "$running_out" == *"(no matching tasks)"* ]]; then
  running_count=0
else
  running_count="$(printf '%s\n' "$running_out" | wc -l)"
fi

slots=$(( MAX_PARALLEL - running_count ))

if (( slots <= 0 )); then
  echo "Already at limit running=$running_count max=$MAX_PARALLEL dispatch skipped"
  exit 0
fi

echo "running=$running_count max=$MAX_PARALLEL slots=$slots dispatching up to $slots"

hermes kanban "${board_args[@]}" dispatch --max "$slots"
