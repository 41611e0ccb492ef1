"""`mmtag info`'s table says what its validation figure is: out of fold (with each fold's spread)
for a cross-fitted run, plain rows for a split."""
from mmtag.jobs.info import info_rows


def _data(folds):
    return {
        "run": "runs/x", "head": {"name": "text", "hidden": 64, "dims": {"text": 384}},
        "encoders": {}, "labels": {"ids": [1, 2], "names": ["person", "bicycle"]},
        "thresholds": {"mode": "global", "values": [0.4, 0.4]},
        "validation": {"samples_f1": 0.9, "micro_f1": 0.8, "macro_f1": 0.7, "n": 300},
        "folds": folds, "config": {}, "model_size_mb": 1.0,
    }


def test_validation_row_of_a_cross_fitted_run_is_out_of_fold():
    rows = dict(info_rows(_data({"k": 3, "samples_f1": [0.88, 0.90, 0.92]})))
    assert rows["validation"].endswith("(out of fold, 300 rows, 3 folds: per fold 0.9000 ± 0.0200)")


def test_validation_row_of_a_split_gives_its_rows():
    for folds in (None, {}):
        assert dict(info_rows(_data(folds)))["validation"].endswith("(300 rows)")


def test_labels_row_cuts_long_names_and_lists_at_most_a_hundred_labels():
    from mmtag.jobs.info import LISTED_LABELS

    data = _data(None)
    long = "x" * 100_000
    data["labels"] = {"ids": list(range(250)), "names": [long] + [f"tag{i}" for i in range(1, 250)]}
    rows = dict(info_rows(data))
    text = rows["labels (250)"]
    assert text.startswith("0 " + "x" * 40 + "…(100,000 chars), 1 tag1, ")
    assert f"{LISTED_LABELS - 1} tag{LISTED_LABELS - 1}, … and 150 more (--json lists all)" in text
    assert len(text) < 2_000


def test_the_metric_the_run_optimised_is_a_row():
    assert dict(info_rows(_data(None)))["optimised for"] == "sample-F1 (--metric samples)"  # older runs
    data = _data(None)
    data["config"] = {"train": {"metric": "macro"}}
    assert dict(info_rows(data))["optimised for"] == "macro-F1 (--metric macro)"
