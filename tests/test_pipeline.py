"""Wiring: dvc.yaml declares what each stage imports and reads; `dvc repro` on a tiny copy of the project."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import DEFAULT_PARAMS, ROOT, make_project, synthetic_rows, write_csv

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((DEFAULT_PARAMS).read_text())


PACKAGES = ("stages", "sft_pipeline")


def module_file(name: str) -> Path | None:
    for candidate in (ROOT / f"{name.replace('.', '/')}.py", ROOT / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(module: str, seen: set | None = None) -> set[str]:
    """Modules of this project (stages.*, sft_pipeline.*) that `module` imports, transitively, anywhere in its code
    (imports inside functions count: they run when the stage does); a package counts with its __init__."""
    seen = set() if seen is None else seen
    tree = ast.parse(module_file(module).read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
        for name in names:
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                prefix = ".".join(parts[:end])
                if prefix not in seen and module_file(prefix) is not None:
                    seen.add(prefix)
                    project_imports(prefix, seen)
    return seen


def render(value: str) -> str:
    return re.sub(r"\$\{paths\.(\w+)\}", lambda m: PARAMS["paths"][m.group(1)], value)


def names(entries) -> list[str]:
    return [render(next(iter(e)) if isinstance(e, dict) else e) for e in entries or []]


@pytest.mark.parametrize("stage", list(DVC))
def test_each_stage_declares_its_code_params_and_paths(stage):
    spec = DVC[stage]
    assert spec["cmd"] == f"python -m stages.{stage}"
    deps = names(spec["deps"])
    needed = {module_file(m).relative_to(ROOT).as_posix() for m in project_imports(f"stages.{stage}")}
    needed.add(f"stages/{stage}.py")
    # A declared folder (sft_pipeline/tasks) covers every file in it.
    undeclared = {f for f in needed if f not in deps and not any(f.startswith(d.rstrip("/") + "/") for d in deps)}
    assert not undeclared, f"{stage}: undeclared code deps {sorted(undeclared)}"
    assert stage in spec["params"] and "task" in spec["params"]
    declared = {str(p) for p in PARAMS["paths"].values()}
    for path in deps + names(spec.get("outs")) + names(spec.get("metrics")) + names(spec.get("plots")):
        assert path.startswith(PACKAGES) or path in declared, f"{stage}: {path} is not a paths.* value"


def test_stages_folder_holds_the_six_stages_only():
    """Entry points apart from the library: stages/ is what dvc.yaml runs, nothing else."""
    modules = {p.stem for p in (ROOT / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(DVC) == {"clean", "validate", "split", "tokenize", "train", "evaluate"}


def test_stage_modules_hold_no_task_or_strategy_branches():
    """Stages ask the task and the strategy; a stage that tests which one it has would grow with every new one."""
    pattern = re.compile(r"""(task\.(type|name)|\.strategy|\[["'](task|strategy)["']\])\s*(==|!=|in\b)|"""
                         r"""["'](classification|lora|freeze|prompt_tuning)["']""")
    offenders = [f"{p.name}:{n}: {line.strip()}" for p in (ROOT / "stages").glob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_heavy_libraries_stay_out_of_the_data_stages():
    code = "import sys; import stages.clean, stages.validate, stages.split; print(sorted(m for m in ('torch', " \
           "'transformers', 'mlflow', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_output_path_is_produced_by_exactly_one_stage():
    outs = [p for spec in DVC.values() for key in ("outs", "metrics", "plots") for p in names(spec.get(key))]
    assert len(outs) == len(set(outs))


# ---------------------------------------------------------------------------------------------- end to end


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                            text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def split_membership(project: Path) -> dict[str, str]:
    return {text: name for name in ("train", "validation", "test")
            for text in pd.read_parquet(project / "data/split" / f"{name}.parquet")["text"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert):
    """A copy of the project with tiny data and a tiny BERT, after one `dvc repro`."""
    rows = synthetic_rows(30, seed=11)
    rows += [dict(rows[0])]  # an exact duplicate
    rows += [{"id": "bad", "text": "A text with an unknown label", "label": "weather"}]
    root = make_project(tmp_path_factory.mktemp("project"), tiny_bert, rows)
    first = dvc(root, "repro")
    return root, first.stdout


@pytest.mark.e2e
def test_repro_runs_every_stage_and_accounts_for_rows(project):
    root, output = project
    assert ran_stages(output) == ["clean", "validate", "split", "tokenize", "train", "evaluate"]
    clean_report = json.loads((root / "reports/clean.json").read_text())
    validation = json.loads((root / "reports/validation.json").read_text())
    assert clean_report["totals"]["rows_read"] == 92
    assert clean_report["totals"]["rejected"] == {"duplicate": 1}
    assert validation["rejected"] == {"unknown_label": 1}
    assert validation["kept"] == 90
    splits = json.loads((root / "reports/split.json").read_text())["rows"]
    assert sum(splits.values()) == 90
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["test_rows"] == splits["test"]
    assert (root / "models/model/model.safetensors").is_file()
    assert (root / "models/checkpoints/fingerprint.json").is_file()


@pytest.mark.e2e
def test_the_run_is_scored_beside_its_baselines_and_the_summary_says_so(project):
    from sft_pipeline import baselines

    root, _ = project
    metrics = json.loads((root / "reports/metrics.json").read_text())
    details = json.loads((root / "reports/evaluation.json").read_text())
    train = pd.read_parquet(root / "data/split/train.parquet")
    test = pd.read_parquet(root / "data/split/test.parquet")
    again = baselines.run(train["text"].tolist(), train["label"].tolist(), test["text"].tolist(),
                          test["label"].tolist())
    for name in ("majority", "tfidf_logreg"):
        assert metrics["baselines"][name] == {k: again[name][k] for k in ("accuracy", "macro_f1")}
    assert details["baselines"]["tfidf_logreg"]["train_rows"] == len(train)
    summary = subprocess.run([sys.executable, "-m", "sft_pipeline.summary"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
    tfidf = metrics["baselines"]["tfidf_logreg"]
    assert (f"Baseline, TF-IDF character n-gram + logistic regression: macro-F1 {tfidf['macro_f1']:.4f}, "
            f"accuracy {tfidf['accuracy']:.4f} (fine-tuned {metrics['macro']['f1'] - tfidf['macro_f1']:+.4f}") in summary
    assert "Baseline, majority-class: macro-F1" in summary
    beaten = metrics["macro"]["f1"] > tfidf["macro_f1"]
    assert ("does not beat the TF-IDF" in summary) is not beaten


@pytest.mark.e2e
def test_second_repro_does_nothing_and_dvc_views_work(project):
    root, _ = project
    again = dvc(root, "repro")
    assert ran_stages(again.stdout) == []
    metrics = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    assert "accuracy" in json.dumps(metrics)
    plots = dvc(root, "plots", "show", "-o", str(root / "plots_out"))
    assert (root / "plots_out" / "index.html").is_file(), plots.stdout


@pytest.mark.e2e
def test_train_param_change_reruns_train_and_evaluate_only(project):
    root, _ = project
    # `dvc params diff` compares with the last commit: commit the params first, as a user would.
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git, "add", "params.yaml", "dvc.yaml"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=root, check=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    old_rate = params["train"]["learning_rate"]
    params["train"]["learning_rate"] = 4e-3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(root, "repro")
    assert ran_stages(result.stdout) == ["train", "evaluate"]
    diff = json.loads(dvc(root, "params", "diff", "--json").stdout)
    assert list(diff["params.yaml"]) == ["train.learning_rate"]
    assert diff["params.yaml"]["train.learning_rate"]["old"] == old_rate
    assert diff["params.yaml"]["train.learning_rate"]["new"] == 4e-3


@pytest.mark.e2e
def test_new_annotation_file_reruns_data_stages_and_keeps_splits(project):
    root, _ = project
    before = split_membership(root)
    write_csv(root / "data/raw/batch2.csv", synthetic_rows(8, seed=99, prefix="new"))
    result = dvc(root, "repro")
    assert ran_stages(result.stdout)[:4] == ["clean", "validate", "split", "tokenize"]
    after = split_membership(root)
    assert len(after) > len(before)
    moved = {text for text, name in before.items() if after.get(text) != name}
    assert moved == set()
