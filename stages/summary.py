"""Print where the results of the last `dvc repro` are, with the test metrics (the last step of `make run`).

    python -m stages.summary [--params params.yaml]

Not a DVC stage: it only reads paths.metrics, paths.train_report, paths.validate_report, paths.promotion.
"""

from __future__ import annotations

import argparse
import sys

from stages.io import StageError, read_json, run_main
from stages.params import add_params_argument, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_argument(parser)
    args = parser.parse_args(argv)

    def body() -> None:
        paths = load(args.params).paths
        if not paths.metrics.is_file():
            raise StageError(f"{paths.metrics}: no metrics yet; run `make run`")
        metrics = read_json(paths.metrics)
        validation = read_json(paths.validate_report)
        train = read_json(paths.train_report)
        print()
        print(f"Test set ({metrics['test_rows']} rows): accuracy {metrics['accuracy']:.4f}, "
              f"macro-F1 {metrics['macro']['f1']:.4f}, weighted-F1 {metrics['weighted']['f1']:.4f}")
        for label, m in metrics["per_class"].items():
            print(f"  {label:<20} P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  n={m['support']}")
        overall = validation["overall"]
        print(f"Data: {overall['rows_read']} rows read, {overall['kept']} kept; rejected by clean "
              f"{overall['clean_rejected']}, by validate {validation['rejected']}")
        print(f"Training: {train['global_steps']} steps in {train['runtime_s']} s on {train['device']}, "
              f"best validation macro-F1 {train['best_validation_macro_f1']} (epoch {train['best_epoch']})")
        print(f"Model:    {paths.model_dir}/ (safetensors + tokenizer)")
        if paths.promotion.is_file():
            promotion = read_json(paths.promotion)
            print(f"MLflow:   run {promotion['run_id']}, {promotion['model']} v{promotion['version']} is "
                  f"{promotion['alias']} ({promotion['reason']}); `make ui` to compare runs")
        print(f"Reports:  {paths.validate_summary}, {paths.evaluation}, {paths.clean_rejected.parent}/")
        print("Compare:  dvc metrics show | dvc params diff | dvc plots show")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
