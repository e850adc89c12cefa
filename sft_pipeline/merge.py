"""Merge a LoRA-trained model into a standalone full copy (safetensors), to ship or serve without its base model.

    python -m sft_pipeline.merge [--params params.yaml] [--out models/merged] [--base PATH_OR_HUB_ID]

Reads  paths.model_dir (trained with train.strategy: lora) and its base model (model.name, or --base)
Writes --out (default: paths.model_dir with "-merged" appended): the merged weights, the tokenizer and
       sft_model.json (strategy full, merged_from lora); `AutoModelForSequenceClassification.from_pretrained(out)`
       (or the task's Auto class) loads it like any model

Made on demand, never by `dvc repro`: at 7B the adapter is a few MB and the merged copy the size of the base. A soft
prompt (prompt_tuning) is an input, not a weight change, and cannot be merged; full and freeze are full copies
already. Predictions of the merged model equal the adapter's to float rounding (tests/test_strategies.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sft_pipeline.io import atomic_path, run_main
from sft_pipeline.params import add_params_argument, load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_params_argument(parser)
    parser.add_argument("--out", type=Path, help="output folder (default: paths.model_dir + '-merged')")
    parser.add_argument("--base", help="the base model's folder or hub id, if not where training found it")
    args = parser.parse_args(argv)

    def body() -> None:
        from sft_pipeline.strategies import merge

        params = load(args.params)
        model_dir = params.paths.model_dir
        out = args.out or model_dir.with_name(model_dir.name + "-merged")
        with atomic_path(out, directory=True) as tmp:
            info = merge(model_dir, tmp, base=args.base)
        print(f"{out}: {info['merged_from']['strategy']} adapter of {model_dir} merged into a full copy of "
              f"{info['base']['name']}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
