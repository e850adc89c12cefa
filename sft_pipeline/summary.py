"""Print where the results of the last `dvc repro` are, with the test metrics (the last step of `make run`).

    python -m sft_pipeline.summary [--params params.yaml]

Not a DVC stage: it only reads paths.metrics, paths.train_report, paths.validate_report, paths.promotion.
"""

from __future__ import annotations

import argparse
import sys

from sft_pipeline import tasks
from sft_pipeline.io import StageError, read_json, run_main
from sft_pipeline.params import add_params_argument, load
from sft_pipeline.strategies import ADAPTERS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_argument(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        params = load(args.params)
        paths = params.paths
        if not paths.metrics.is_file():
            raise StageError(f"{paths.metrics}: no metrics yet; run `make run`")
        metrics = read_json(paths.metrics)
        validation = read_json(paths.validate_report)
        train = read_json(paths.train_report)
        print()
        print("\n".join(tasks.get(params).metrics_lines(metrics)))
        overall = validation["overall"]
        print(f"Data: {overall['rows_read']} rows read, {overall['kept']} kept; rejected by clean "
              f"{overall['clean_rejected']}, by validate {validation['rejected']}")
        best = train["best_metric"]
        print(f"Training: strategy {train['strategy']}, {train['trainable_params']:,} of {train['total_params']:,} "
              f"parameters trained; {train['global_steps']} steps in {train['runtime_s']} s on {train['device']}, "
              f"best validation {best} {train[f'best_validation_{best}']} (epoch {train['best_epoch']})")
        kind = "adapter" if train["strategy"] in ADAPTERS else "weights"
        print(f"Model:    {paths.model_dir}/ ({kind} as safetensors + tokenizer; "
              f"sft_pipeline.strategies.load_trained loads it)")
        if paths.promotion.is_file():
            promotion = read_json(paths.promotion)
            print(f"MLflow:   run {promotion['run_id']}, {promotion['model']} v{promotion['version']} is "
                  f"{promotion['alias']} ({promotion['reason']}); `make ui` to compare runs")
        print(f"Reports:  {paths.validate_summary}, {paths.evaluation}, {paths.clean_rejected.parent}/")
        print("Compare:  dvc metrics show | dvc params diff | dvc plots show")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
