import csv

from mmtag.jobs.ablate import run_ablation, uses_extra_text


def test_ablation_writes_one_row_per_variant(tiny, make_config, tmp_path):
    variants = ["image", "text", "union", "xattn+mean", "gated"]
    rows = run_ablation(tiny.train_csv, tiny.images, tmp_path, make_config(**{"train.epochs": 8}),
                        variants, extra_text=tiny.holdout_csv, progress=False)
    assert [r.variant for r in rows] == variants
    with open(tmp_path / "ablation.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["variant", "samples_f1", "micro_f1", "macro_f1", "train_s", "predict_s",
                              "model_size_mb", "folds", "samples_f1_std", "stack"]
    assert [t["variant"] for t in table] == variants
    assert all(0 < float(t["samples_f1"]) <= 1 and float(t["model_size_mb"]) > 0 for t in table)
    md = (tmp_path / "ablation.md").read_text()
    best = max(rows, key=lambda r: r.samples_f1).variant
    assert f"Best variant by validation sample-F1 (one seeded split): {best}." in md
    assert "trained: text, union, xattn+mean, gated" in md  # heads with a separate text branch
    assert (tmp_path / "runs" / "xattn_mean" / "manifest.json").is_file()


def test_which_variants_take_extra_text():
    assert uses_extra_text("text") and uses_extra_text("mean") and uses_extra_text("gated")
    assert uses_extra_text("concat+mean") and uses_extra_text("xattn+mean")
    assert not uses_extra_text("image") and not uses_extra_text("concat") and not uses_extra_text("xattn")


def test_a_head_registered_here_is_ablated_and_validated_without_editing_mmtag():
    """The registry is the one source of head names: `ablate`'s default variants, config
    validation and the unpaired-caption capability all read it."""
    from mmtag.jobs.ablate import default_variants
    from mmtag.config import Config
    from mmtag.heads import HEADS, HeadOutput, TextHead, register_head

    @register_head("toy-text")
    class ToyText(TextHead):
        """A text head that doubles its logits."""

        def forward(self, batch):
            return HeadOutput(2 * self.net(batch["text"]))

    try:
        assert "toy-text" in default_variants()
        assert Config().override({"model.fusion": "toy-text"}).model.fusion == "toy-text"
        assert uses_extra_text("toy-text")
    finally:
        HEADS.pop("toy-text")
    assert "toy-text" not in default_variants()


def test_ablation_with_folds_ranks_by_out_of_fold_figures(tiny, make_config, tmp_path):
    rows = run_ablation(tiny.train_csv, tiny.images, tmp_path,
                        make_config(**{"train.epochs": 4, "train.folds": 3}), ["text", "mean"],
                        progress=False)
    assert all(r.folds == 3 and r.samples_f1_std > 0 for r in rows)
    md = (tmp_path / "ablation.md").read_text()
    best = max(rows, key=lambda r: r.samples_f1)
    assert [r.stack for r in rows] == [False, True]  # late fusion is stacked wherever it can be
    name = best.variant + (" (stacked)" if best.stack else "")
    assert f"| **{name}** | {best.samples_f1:.4f} ± {best.samples_f1_std:.4f} |" in md
    assert f"Best variant by out-of-fold sample-F1 (3 folds;" in md


def test_the_table_ranks_by_the_metric_asked_for_and_says_which(tmp_path):
    from mmtag.jobs.ablate import AblationRow, write_tables

    rows = [AblationRow("image", 0.80, 0.70, 0.40, 1.0, 0.1, 5.0, folds=3, samples_f1_std=0.01),
            AblationRow("text", 0.75, 0.72, 0.60, 1.0, 0.1, 5.0, folds=3, samples_f1_std=0.02),
            AblationRow("concat", 0.78, 0.74, 0.50, 1.0, 0.1, 5.0, folds=3, samples_f1_std=0.01)]
    for metric, best, title in (("samples", "image", "sample-F1"), ("micro", "concat", "micro-F1"),
                                ("macro", "text", "macro-F1")):
        write_tables(tmp_path, rows, metric=metric)
        md = (tmp_path / "ablation.md").read_text()
        assert f"| **{best}** |" in md and md.count("**") == 2
        assert f"Best variant by out-of-fold {title} (3 folds;" in md
    write_tables(tmp_path, [AblationRow("image", 0.8, 0.7, 0.4, 1.0, 0.1, 5.0)], metric="macro")
    assert "Best variant by validation macro-F1 (one seeded split): image." in \
        (tmp_path / "ablation.md").read_text()
