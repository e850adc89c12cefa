"""The embedded default: BBC News imported byte for byte, and every article accounted for by clean and validate."""

import pandas as pd

from stages import clean, validate
from sft_pipeline.defaults import import_data
from sft_pipeline.params import parse
from tests.conftest import ROOT, project_params


def test_bbc_import_keeps_the_real_defects_and_every_article_is_accounted_for(tmp_path):
    raw = project_params(tmp_path)
    real = parse({**raw, "validate": {**raw["validate"], **_project_validate()}})
    target = import_data(real.paths.raw_dir)
    data = target.read_bytes()
    assert data.count(b"\n") >= 2226 and b"\xa315.8m" in data  # the Windows-1252 pound sign, not re-encoded

    report = clean.run(real)
    assert report["totals"]["rows_read"] == 2225
    assert report["totals"]["rejected"] == {"duplicate": 100}
    assert report["totals"]["kept"] == 2125
    fallback = report["files"]["bbc_news.csv"]["decoded_with_fallback"]
    assert fallback["count"] == 1 and fallback["first_rows"][0]["id"] == "sports/199"
    kept = pd.read_parquet(real.paths.clean)
    assert "£15.8m" in kept.loc[kept["id"] == "sports/199", "text"].iloc[0]

    result = validate.run(real)
    assert result["overall"]["rows_read"] == result["kept"] + report["totals"]["rejected"]["duplicate"] \
        + sum(result["rejected"].values()) == 2225
    assert result["classes"] == {"business": 503, "entertainment": 369, "politics": 403, "sport": 503, "tech": 347}
    assert result["labels_mapped"] == {"sports -> sport": 503}


def _project_validate() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())["validate"]


def test_your_own_annotations_are_not_mixed_with_the_default(tmp_path):
    (tmp_path / "mine.csv").write_text("id,text,label\n1,hello there,sport\n", encoding="utf-8")
    assert import_data(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.csv"]
