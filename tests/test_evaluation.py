"""The evaluation protocol (moderation.evaluation), written once for the calibration job, the
trainer and the benchmarks.

- N counts every ground-truth pair of the evaluated queries: a query that fails to decode is a
  missed positive, in the calibration job (real Postgres and store) and in the trainer's evaluation;
- restricting the ground truth to the evaluated queries is linear;
- the statistics are fitted on the background, never on the references: on data where fitting on
  the references gives other, better-looking figures, the evaluation gives the background's;
- background and references sharing an image is refused, and training refuses to read the
  validation set's references and queries;
- the jobs, the trainer and the benchmarks call the protocol instead of re-writing it.

Images and the toy descriptor are made here.
"""

from __future__ import annotations

import csv
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from review_support import fresh_pg_database, local_pipeline, settings_from, torch_single_thread  # noqa: F401
from test_trainer_helpers import make_validation_set, tiny_config

from moderation.config import Postprocess, Settings
from moderation.embedding import FolderSource, embed
from moderation.errors import ModerationError
from moderation.evaluation import (ValidationSet, evaluate_labelled_set, evaluate_matches, global_stage,
                                   restrict_ground_truth)
from moderation.images import Failure, ImageRef
from moderation.index import build_index
from moderation.matching import Candidate
from moderation.metrics import read_ground_truth
from moderation.statistics import BackgroundIndex, fit_postprocessor
from moderation.two_stage import TwoStageConfig, TwoStageResult, match_queries
from moderation.views import ViewConfig

REPO = Path(__file__).resolve().parent.parent
BROKEN_JPEG = b"\xff\xd8\xff\xe0 this is not a decodable JPEG"


class PatchColours(torch.nn.Module):
    """A fixed toy descriptor: the mean colour of a 4x4 grid of patches (48-d), L2-normalised."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return torch.nn.functional.normalize(f, dim=1)


@pytest.fixture
def toy_settings(tmp_path) -> Settings:
    return Settings.from_env({"MODERATION_HOME": str(tmp_path / "home"), "MODERATION_IMAGE_SIZE": "64",
                              "MODERATION_WORKERS": "0", "MODERATION_PROGRESS": "false",
                              "MODERATION_DEVICE": "cpu", "MODERATION_BATCH_SIZE": "16"})


@pytest.fixture
def val_set(tmp_path) -> Path:
    return make_validation_set(tmp_path / "val")


def _add_broken_positive(folder: Path, gt_csv: Path, reference: str) -> None:
    (folder / "Qbroken.jpg").write_bytes(BROKEN_JPEG)
    with open(gt_csv, "a", newline="") as fh:
        csv.writer(fh).writerow(["Qbroken", reference])


def _positives(gt_csv: Path) -> int:
    return sum(1 for r in read_ground_truth(gt_csv).values() if r is not None)


# -- N: an undecodable query is a missed positive ------------------------------------------------


def test_an_undecodable_positive_is_missed_in_the_calibration_job(tmp_path):
    from moderation.jobs import Pipeline, calibrate_labelled

    with fresh_pg_database() as url:
        env, samples = local_pipeline(tmp_path / "home", url, MODERATION_MAX_FAILURE_RATE="0.5")
        queries = tmp_path / "labelled"
        shutil.copytree(samples.queries, queries)
        gt_csv = tmp_path / "gt.csv"
        shutil.copyfile(samples.ground_truth, gt_csv)
        _add_broken_positive(queries, gt_csv, sorted(p.stem for p in Path(samples.references).iterdir())[0])
        p = Pipeline.open(settings_from(env))
        try:
            _, metrics = calibrate_labelled(p, FolderSource(queries), gt_csv, store=False)
        finally:
            p.db.engine.dispose()
    n = _positives(gt_csv)
    assert metrics["n_failed"] == 1 and metrics["n_failed_positives"] == 1
    assert metrics["n_positives"] == n  # not n - 1: the failed query is a positive the system missed
    assert metrics["recall_at_1"] <= (n - 1) / n
    assert metrics["rp90_sn"] <= (n - 1) / n


def test_an_undecodable_positive_is_missed_in_the_trainer_evaluation(val_set, toy_settings):
    vs = ValidationSet.from_dir(val_set)
    before = evaluate_labelled_set(PatchColours(), vs, toy_settings).metrics
    _add_broken_positive(vs.queries, vs.ground_truth, "R000")
    after = evaluate_labelled_set(PatchColours(), vs, toy_settings).metrics
    assert (after["n_positives"], after["n_failed"], after["n_failed_positives"]) == (before["n_positives"] + 1, 1, 1)
    # The same predictions over one more positive: every recall shrinks by n / (n + 1).
    n = before["n_positives"]
    assert after["recall_at_1"] == pytest.approx(before["recall_at_1"] * n / (n + 1))
    assert after["uap_sn"] == pytest.approx(before["uap_sn"] * n / (n + 1))


def test_ground_truth_rows_of_queries_outside_the_set_do_not_count():
    gt = {"q1": "r1", "q2": "r2", "elsewhere": "r3", "q3": None}
    matched = TwoStageResult([ImageRef("q1", "q1.jpg", "a"), ImageRef("q3", "q3.jpg", "c")], torch.zeros(2, 1).numpy(),
                             [Candidate("q1", "r1", 0.9, 0.9, 1), Candidate("q3", "r1", 0.2, 0.2, 1)],
                             [Failure("q2", "q2.jpg", "unreadable", "")])
    ev = evaluate_matches(matched, gt, TwoStageConfig(views=ViewConfig(), verify=False))
    assert ev.ground_truth == {"q1": "r1", "q2": "r2", "q3": None}
    assert ev.metrics["n_positives"] == 2 and ev.metrics["recall_at_1"] == 0.5


def test_restricting_the_ground_truth_is_linear():
    n = 200_000
    gt = {f"Q{i:07d}": (f"R{i:07d}" if i % 3 else None) for i in range(n)}
    ids = [f"Q{i:07d}" for i in range(0, n, 2)]
    t0 = time.perf_counter()
    kept = restrict_ground_truth(gt, ids)
    seconds = time.perf_counter() - t0
    assert len(kept) == n // 2
    # A set rebuilt per row would take hours here; linear work takes well under a second.
    assert seconds < 10, seconds


def test_evaluating_many_queries_is_fast():
    n = 20_000
    refs = [ImageRef(f"Q{i:06d}", "", "") for i in range(n)]
    cands = [Candidate(f"Q{i:06d}", f"R{i % 500:04d}", s, s, 1) for i in range(n) for s in [((i * 7919) % 1000) / 1000]]
    gt = {f"Q{i:06d}": f"R{i % 500:04d}" if i % 2 else f"R{(i + 1) % 500:04d}" for i in range(n)}
    t0 = time.perf_counter()
    ev = evaluate_matches(TwoStageResult(refs, torch.zeros(n, 1).numpy(), cands, []), gt,
                          TwoStageConfig(views=ViewConfig(), verify=False))
    assert ev.metrics["n_positives"] == n
    assert time.perf_counter() - t0 < 30


# -- statistics on the background, never on the references ---------------------------------------


def _space_fitted_on(fit_vectors, refs, background):
    post = fit_postprocessor(fit_vectors, Postprocess.WHITEN)
    return post, BackgroundIndex(post.apply(background.vectors)), build_index(post.apply(refs.vectors), refs.ids,
                                                                              "Flat")


def test_statistics_are_fitted_on_the_background_not_the_references(val_set, toy_settings):
    # Six background images: whitening fitted on them keeps 5 of the 48 dimensions, on the 20
    # references 19, so the leak reads clearly better: the mistake cannot hide in the noise.
    for extra in sorted((val_set / "background").iterdir())[6:]:
        extra.unlink()
    model, vs, s = PatchColours(), ValidationSet.from_dir(val_set), toy_settings
    gt = read_ground_truth(vs.ground_truth)
    refs = embed(model, FolderSource(vs.references), s)
    background = embed(model, FolderSource(vs.background), s)
    config = global_stage(s)

    def figures(fit_vectors) -> dict:
        post, bg, index = _space_fitted_on(fit_vectors, refs, background)
        matched = match_queries(model, FolderSource(vs.queries), s, config, index, post, bg, keep_all=True)
        return evaluate_matches(matched, gt, config).metrics

    honest, leaked = figures(background.vectors), figures(refs.vectors)
    # The data makes the mistake visible: whitening fitted on the references reads better.
    assert leaked["uap_sn"] > honest["uap_sn"] + 0.01, (leaked["uap_sn"], honest["uap_sn"])
    got = evaluate_labelled_set(model, vs, s).metrics
    for key in ("uap", "uap_sn", "rp90_sn", "recall_at_1", "threshold"):
        assert got[key] == pytest.approx(honest[key]), key
    assert got["postprocess"] == "whiten-on-background"


def test_background_that_holds_a_reference_is_refused(val_set, toy_settings):
    shutil.copyfile(val_set / "references" / "R007.png", val_set / "background" / "B_extra.png")
    with pytest.raises(ModerationError, match=r"background images are also references .*B_extra = reference R007"):
        evaluate_labelled_set(PatchColours(), ValidationSet.from_dir(val_set), toy_settings)


# -- training never reads the validation set's references or queries ------------------------------


def test_training_refuses_the_validation_references_and_queries(val_set, tmp_path):
    from trainer import loop
    from trainer.data import ImagePool, PoolItem, validation_hashes
    from trainer.synthetic import synthetic_image

    train = tmp_path / "train"
    train.mkdir()
    for i in range(12):
        synthetic_image(900 + i, max_side=80).save(train / f"t{i:02d}.png")
    excluded = validation_hashes(val_set)
    assert len(excluded) == len(list((val_set / "references").iterdir())) + len(list((val_set / "queries").iterdir()))
    ImagePool.build([str(train)], excluded=excluded)  # disjoint: fine

    shutil.copyfile(val_set / "references" / "R004.png", train / "renamed.png")
    with pytest.raises(ModerationError, match="renamed.png is the evaluation image .*R004.png"):
        ImagePool.build([str(train)], excluded=excluded)
    with pytest.raises(ModerationError, match="renamed.png is the evaluation image"):
        loop.train(tiny_config(train, tmp_path / "run", steps=1, val_dir=str(val_set)))
    with pytest.raises(ModerationError, match="overlaps the evaluation folder"):
        ImagePool.build([str(val_set)], excluded=excluded)  # the set's root holds references/
    # An image read lazily (an object-store key is not read ahead of training) is refused when read.
    pool = ImagePool([PoolItem("file", str(train / "renamed.png"))], excluded=excluded)
    with pytest.raises(ModerationError, match="evaluation image"):
        pool.load(0)


# -- one protocol --------------------------------------------------------------------------------


def test_jobs_trainer_and_benchmarks_call_the_protocol_instead_of_rewriting_it():
    callers = [REPO / "moderation" / "jobs.py", *sorted((REPO / "trainer").glob("*.py")),
               *sorted((REPO / "benchmarks").glob("*.py"))]
    rewritten = re.compile(r"\b(calibrate|calibrate_fused|fit_postprocessor|restrict_ground_truth)\(|"
                           r"from moderation\.metrics import[^\n]*\bevaluate\b|trainer\.evaluate")
    offenders = {}
    for path in callers:
        if path.name == "retro_bench.py":  # times search on synthetic vectors: no labelled evaluation in it
            continue
        text = path.read_text()
        # The matching benchmark times search on synthetic vectors: no labelled evaluation in it.
        text = re.sub(r"def matching_time\(.*?\n(?=def )", "", text, flags=re.S)
        found = rewritten.findall(text)
        if found:
            offenders[path.name] = found
    assert offenders == {}
    uses = {path.name for path in callers if "moderation.evaluation" in path.read_text()}
    assert {"jobs.py", "publish.py", "pipeline_bench.py", "train_bench.py", "two_stage_bench.py"} <= uses
