"""`dvc plots show` renders offline in a real browser; metrics, plots and dvc.lock have a history in git.

One tiny project (tests/conftest.py make_project, with the repository's .gitignore and DVC config, as a clone has
them) is run twice, each run committed as a user would: `git add -A`, then `dvc metrics diff`, `dvc exp show` and
`dvc plots diff` compare the two commits. The page DVC writes is opened in headless Chromium with every host
unresolvable and every connection sent to a closed port; DVC's own page, under the same conditions, is blank.

Chromium: Debian's package (`apt-get install chromium`; .ci/run installs it). Without it the browser tests skip with
that reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import ROOT, make_project, synthetic_rows
from tests.test_pipeline import dvc, ran_stages

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
# The plots of dvc.yaml: DVC's id of each plot's <div> (its path, with _ for / and .), its title and its data file.
PLOTS = {"reports_train_history_csv": ("Training loss per optimizer step", "reports/train_history.csv"),
         "reports_eval_history_csv": ("Validation loss per epoch", "reports/eval_history.csv"),
         "reports_test_predictions_csv": ("Test confusion matrix", "reports/test_predictions.csv")}
FIRST_RATE, SECOND_RATE = 2e-2, 1e-6


def git(root: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=root, capture_output=True, text=True, check=True).stdout


def commit_run(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "commit", "-qm", message)


@pytest.fixture(scope="module")
def history(tmp_path_factory, tiny_bert):
    """A project with two committed runs, the second with a learning rate too small to learn anything; and what
    `dvc metrics diff` and `dvc params diff` said before the second run was committed."""
    # 6 epochs at 2e-2: the tiny random model learns the three topics (macro-F1 1.0 here; at 2 epochs, chance).
    root = make_project(tmp_path_factory.mktemp("history"), tiny_bert, synthetic_rows(30, seed=11), epochs=6,
                        learning_rate=FIRST_RATE)
    shutil.copy(ROOT / ".gitignore", root / ".gitignore")
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    # As `make install` does; run in the copy, whose own sft_pipeline comes first on sys.path.
    subprocess.run([sys.executable, "-m", "sft_pipeline.plots_page"], cwd=root, check=True, capture_output=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["train"]["learning_rate"] == FIRST_RATE
    first = dvc(root, "repro")
    assert ran_stages(first.stdout) == ["clean", "validate", "split", "tokenize", "train", "evaluate"]
    commit_run(root, "first run")
    params["train"]["learning_rate"] = SECOND_RATE
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = dvc(root, "repro")
    assert ran_stages(second.stdout) == ["train", "evaluate"]
    before_commit = {"metrics": json.loads(dvc(root, "metrics", "diff", "--json").stdout),
                     "params": json.loads(dvc(root, "params", "diff", "--json").stdout)}
    commit_run(root, "second run")
    return root, before_commit


def uncached_outputs(root: Path) -> set[str]:
    """The outputs dvc.yaml marks `cache: false`, as paths (dvc.yaml templates them from params.yaml)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {os.path.relpath(out.fs_path, root) for stage in repo.index.stages for out in stage.outs
                if not out.use_cache}


# ------------------------------------------------------------------------------------- git and DVC history (defect 7)


@pytest.mark.e2e
def test_git_tracks_the_small_outputs_and_dvc_the_large_ones(history):
    root, _ = history
    tracked = set(git(root, "ls-files").split())
    lock = yaml.safe_load(git(root, "show", "HEAD:dvc.lock"))
    outs = {out["path"] for body in lock["stages"].values() for out in body.get("outs", [])}
    uncached = uncached_outputs(root)
    # Every `cache: false` output but the checkpoints, and dvc.lock with params.yaml, are in the commit.
    assert {"dvc.lock", "params.yaml", "dvc.yaml", ".dvc/config", ".gitignore"} <= tracked
    assert {"reports/metrics.json", "reports/train_history.csv", "reports/eval_history.csv",
            "reports/test_predictions.csv", "reports/evaluation.json", "reports/validation.md"} <= uncached
    assert uncached - {"models/checkpoints"} <= tracked
    # Cached outputs (data, the model, rejected rows), the checkpoints and the page's template stay out of git.
    cached = outs - uncached
    assert {"data/interim/clean.parquet", "data/split", "data/tokenized", "models/model",
            "reports/rejected/clean.csv", "reports/rejected/validate.csv"} <= cached
    assert not [path for path in tracked for out in cached | {"models/checkpoints", "data/raw"}
                if path == out or path.startswith(out + "/")]
    assert ".dvc/plots_template.html" not in tracked and (root / ".dvc/plots_template.html").is_file()
    assert json.loads(dvc(root, "status", "--json").stdout) == {}
    # The first commit is a whole result: checked out with its DVC outputs, DVC finds it up to date but for the
    # checkpoints, which are this machine's state for resuming the last run (persist, not cached), not history.
    first = json.loads(git(root, "show", "HEAD~1:reports/metrics.json"))
    branch = git(root, "rev-parse", "--abbrev-ref", "HEAD").strip()
    try:
        git(root, "checkout", "-q", "HEAD~1")
        dvc(root, "checkout", "-q")
        assert json.loads((root / "reports/metrics.json").read_text()) == first
        assert json.loads(dvc(root, "status", "--json").stdout) == {
            "train": [{"changed outs": {"models/checkpoints": "modified"}}]}
    finally:
        git(root, "checkout", "-q", branch)
        dvc(root, "checkout", "-q")
    assert json.loads(dvc(root, "status", "--json").stdout) == {}


@pytest.mark.e2e
def test_metrics_diff_compares_the_last_commit_with_the_new_run(history):
    root, before_commit = history
    old = json.loads(git(root, "show", "HEAD~1:reports/metrics.json"))
    new = json.loads(git(root, "show", "HEAD:reports/metrics.json"))
    diff = before_commit["metrics"]["reports/metrics.json"]
    assert diff["accuracy"] == {"old": old["accuracy"], "new": new["accuracy"],
                                "diff": pytest.approx(new["accuracy"] - old["accuracy"])}
    assert diff["macro.f1"]["old"] == old["macro"]["f1"] and diff["macro.f1"]["new"] == new["macro"]["f1"]
    # A learning rate of 1e-6 leaves the tiny model where it started: the numbers must move.
    assert old["macro"]["f1"] - new["macro"]["f1"] > 0.2, (old["macro"], new["macro"])
    rate = before_commit["params"]["params.yaml"]["train.learning_rate"]
    assert (rate["old"], rate["new"]) == (FIRST_RATE, SECOND_RATE)
    # Between two commits, as the README shows it: `dvc metrics diff HEAD~1` once the second run is committed.
    committed = json.loads(dvc(root, "metrics", "diff", "HEAD~1", "--json").stdout)["reports/metrics.json"]
    assert committed["macro.f1"] == diff["macro.f1"]
    assert "macro.f1" in dvc(root, "metrics", "diff", "HEAD~1").stdout


@pytest.mark.e2e
def test_exp_show_lists_both_commits_with_their_params_and_metrics(history):
    root, _ = history
    rows = json.loads(dvc(root, "exp", "show", "-n", "2", "--json").stdout)
    by_rate = {}
    for row in rows:
        if row["rev"] == "workspace":
            continue
        data = row["data"]
        rate = data["params"]["params.yaml"]["data"]["train"]["learning_rate"]
        by_rate[rate] = (data["rev"], data["metrics"]["reports/metrics.json"]["data"]["macro"]["f1"])
    assert set(by_rate) == {FIRST_RATE, SECOND_RATE}
    for rate, commit in ((SECOND_RATE, "HEAD"), (FIRST_RATE, "HEAD~1")):
        rev, f1 = by_rate[rate]
        assert rev == git(root, "rev-parse", commit).strip()
        assert f1 == json.loads(git(root, "show", f"{commit}:reports/metrics.json"))["macro"]["f1"]


# ----------------------------------------------------------------------------------- the page, offline (defect 2)


def chromium() -> str:
    found = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                 None)
    if found is None:
        reason = "no Chromium: `apt-get install chromium` (Debian's package; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI must render the page")
        pytest.skip(reason)
    return found


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render_offline(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The page's DOM after its scripts ran in headless Chromium with no network, and what the page logged."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}",
               # No network: no host name resolves, and every connection (an address included) goes to a closed port.
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--proxy-server=127.0.0.1:{closed_port()}",
               "--enable-logging=stderr", "--log-level=0",
               # Virtual time runs only while the page is idle: scripts finish first, however loaded the machine is.
               "--virtual-time-budget=30000", "--dump-dom", page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, re.findall(r':CONSOLE[^\]]*\] "(.*)", source: ', result.stderr)


class Drawn(HTMLParser):
    """What vega drew into each plot's <div>: its SVG charts, its texts, and the paths of each mark's group."""

    def __init__(self):
        super().__init__()
        self.plots = defaultdict(lambda: {"svg": 0, "texts": [], "marks": defaultdict(list)})
        self.plot, self.depth, self.groups, self.in_text = None, 0, [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("id") in PLOTS and self.plot is None:
            self.plot, self.depth = attrs["id"], 0
        if self.plot is None:
            return
        self.depth += tag == "div"
        if tag == "svg" and "marks" in attrs.get("class", ""):
            self.plots[self.plot]["svg"] += 1
        if tag == "g":
            self.groups.append(attrs.get("class", ""))
        mark = next((g for g in reversed(self.groups) if "role-mark" in g), None)
        if mark and tag in ("path", "text"):
            self.plots[self.plot]["marks"][mark.split()[-1]].append(attrs)
        self.in_text = tag == "text"

    def handle_endtag(self, tag):
        if self.plot is None:
            return
        if tag == "g" and self.groups:
            self.groups.pop()
        if tag == "div":
            self.depth -= 1
            if self.depth == 0:
                self.plot = None
        self.in_text = False

    def handle_data(self, data):
        if self.plot and self.in_text and data.strip():
            self.plots[self.plot]["texts"].append(data.strip())


def drawn(dom: str) -> dict:
    parser = Drawn()
    parser.feed(dom)
    return parser.plots


def errors(console: list[str]) -> list[str]:
    # Vega warns about the empty hover layers of DVC's templates ("WARN Infinite extent..."); anything else is wrong.
    return [line for line in console if not line.startswith("WARN ")]


@pytest.mark.e2e
def test_dvc_plots_show_renders_the_three_plots_offline(history, tmp_path):
    root, _ = history
    dvc(root, "plots", "show")
    page = root / "dvc_plots" / "index.html"
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page names a network resource"
    dom, console = render_offline(page, tmp_path / "profile")
    assert errors(console) == []
    plots = drawn(dom)
    assert set(plots) == set(PLOTS)
    for plot, (title, data) in PLOTS.items():
        assert plots[plot]["svg"] == 1, plot
        assert title in plots[plot]["texts"], (plot, plots[plot]["texts"])
    # Each loss curve has one vertex per row of its file; the confusion matrix one cell per (actual, predicted) pair.
    for plot, field in (("reports_train_history_csv", "loss"), ("reports_eval_history_csv", "eval_loss")):
        rows = pd.read_csv(root / PLOTS[plot][1]).dropna(subset=[field])
        [line] = [attrs["d"] for attrs in plots[plot]["marks"]["layer_0_layer_0_marks"] if attrs.get("d")]
        assert len(re.findall(r"[ML]", line)) == len(rows), (plot, line[:200])
        assert {"step" if "train" in plot else "epoch", field} <= set(plots[plot]["texts"])
    predictions = pd.read_csv(root / PLOTS["reports_test_predictions_csv"][1])
    confusion = plots["reports_test_predictions_csv"]
    # DVC's confusion template fills absent pairs with a count of 0: one cell per actual and predicted label.
    cells = [attrs for attrs in confusion["marks"]["child_layer_0_marks"] if attrs.get("d")]
    assert len(cells) == predictions["actual"].nunique() * predictions["predicted"].nunique(), len(cells)
    assert set(predictions["actual"]) <= set(confusion["texts"])


@pytest.mark.e2e
def test_dvc_plots_diff_draws_both_commits_offline(history, tmp_path):
    root, _ = history
    out = tmp_path / "diff"
    dvc(root, "plots", "diff", "HEAD~1", "HEAD", "-o", str(out))
    dom, console = render_offline(out / "index.html", tmp_path / "profile")
    assert errors(console) == []
    plots = drawn(dom)
    revisions = {"HEAD~1", "HEAD"}
    for plot in ("reports_train_history_csv", "reports_eval_history_csv"):
        assert revisions <= set(plots[plot]["texts"]), plots[plot]["texts"]
        lines = [attrs["d"] for attrs in plots[plot]["marks"]["layer_0_layer_0_marks"] if attrs.get("d")]
        assert len(lines) == 2, plot
    assert revisions <= set(plots["reports_test_predictions_csv"]["texts"])


@pytest.mark.e2e
def test_dvcs_own_page_is_blank_under_the_same_conditions(history, tmp_path):
    """The control: without the project's template the page needs the CDN, and the offline browser shows nothing."""
    from dvc_render.html import PAGE_HTML

    root, _ = history
    default = tmp_path / "dvc_default.html"
    default.write_text(PAGE_HTML)
    out = tmp_path / "default"
    dvc(root, "plots", "show", "--html-template", str(default), "-o", str(out))
    assert "cdn.jsdelivr.net" in (out / "index.html").read_text()
    dom, console = render_offline(out / "index.html", tmp_path / "profile")
    assert all(plot["svg"] == 0 for plot in drawn(dom).values())
    assert sum("vegaEmbed is not defined" in line for line in console) == 3, console


# ------------------------------------------------------------------------------------------------- the template


def test_template_inlines_the_library_and_refuses_code_that_would_break_the_page():
    from sft_pipeline import plots_page
    from sft_pipeline.io import StageError

    scripts = plots_page.library()
    page = plots_page.template(scripts, "test")
    assert page.count("{plot_divs}") == 1 and page.count("{refresh_tag}") == 1 and "{scripts}" not in page
    assert not re.search(r"<script[^>]*\bsrc=", page)
    for name, code in scripts.items():
        assert code in page and len(code) > 50_000, name
    assert re.search(r'version="5\.\d+\.\d+"', scripts["vega5.js"])
    for bad in ('x = "</script>";', "var s = '{plot_divs}';"):
        with pytest.raises(StageError, match="vega5.js"):
            plots_page.template({"vega5.js": bad})


def test_git_dirty_counts_code_and_params_but_not_the_outputs_git_now_tracks(tmp_path):
    """With the reports in git, every repro changes tracked files; MLflow's git.dirty must still mean "code or params
    differ from the commit"."""
    from sft_pipeline.tracking import git_tags

    for path in ("params.yaml", "stages/train.py", "reports/metrics.json", "dvc.lock"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("1\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    commit_run(tmp_path, "run")
    outputs = (Path("reports/metrics.json"), Path("/elsewhere/not/in/the/repository.json"))
    (tmp_path / "reports/metrics.json").write_text("2\n")
    (tmp_path / "dvc.lock").write_text("2\n")
    assert git_tags(tmp_path, outputs)["git.dirty"] == "false"
    assert git_tags(tmp_path)["git.dirty"] == "true"
    (tmp_path / "params.yaml").write_text("2\n")
    assert git_tags(tmp_path, outputs) == {"git.commit": git(tmp_path, "rev-parse", "HEAD").strip(),
                                           "git.dirty": "true"}
