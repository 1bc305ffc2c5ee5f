"""Keep a run's records (configs, metrics, finished models' results; no checkpoints) in a
folder of their own, and put them back into a workdir to resume there on another machine.

    python scripts/run_records.py save /work/runs/finetune_e2e docs/runs/finetune_smollm2_e2e
    python scripts/run_records.py restore docs/runs/finetune_smollm2_e2e /work/runs/finetune_e2e

After ``restore``, rerunning the run's own command with ``--workdir`` the restored folder
reuses every finished model (``checkpoints/<name>_result.json``, checked against the
config's fingerprint) and trains only the rest; ``scripts/finetune_report.py`` reads the
records folder itself. See ``experiments.common.runs.save_records`` for what is copied and
what is refused.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments.common import runs  # noqa: E402
from experiments.common.trainer import PER_MODEL, RESUMABLE  # noqa: E402

# Fields that may differ between invocations of one run: the resumable ones, the method
# entries (each result carries its own entry's fingerprint) and the seeds (seeds may be
# added to a run).
SAME_RUN_IGNORES = (*RESUMABLE, *PER_MODEL, "seeds")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("source", help="save: the run's --workdir; restore: the records folder")
    parser.add_argument("target", help="save: the records folder; restore: the --workdir")
    args = parser.parse_args(argv)
    copy = runs.save_records if args.action == "save" else runs.restore_records
    try:
        written = copy(args.source, args.target, resumable=SAME_RUN_IGNORES)
    except runs.RecordsError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"{args.action}: {len(written)} file(s) written under {args.target}")


if __name__ == "__main__":
    main()
