"""Does the default recipe hold against the probe? The fine-tuning task suite, served int8.

Seven tasks of different kinds, each an ImageFolder made here from a seed
(``resnet_bench.tasks``: shapes of random size, colour and place; fine-grained ellipses; ten
digits per class; a 5:1 class imbalance; grey-scale PNGs; gratings; texture crops), with a
held-out test split that no choice of the recipe looks at. On each, ``finetune``'s default
options (only the image size is reduced, to keep the suite short); then:

- the baselines are recomputed *here*, independently of the product: scikit-learn logistic
  regression (``C=1``) on the base weights' frozen features, standardised (the probe) and raw
  (the textbook probe, issue 34), fitted on every labelled image ``finetune`` was given (its
  training and validation splits), scored on the test split;
- the bundle is quantized (the default runtime, OpenVINO int8) and served over HTTP, and
  the served answers are scored on the test split.

Goals: served int8 accuracy >= probe - 1 point on every task, >= the probe on the mean
(issue 20); >= the textbook probe - 2 points on every task (issue 34). ``RESNET_SUITE_TASKS``
adds the untuned tasks (``untuned`` or ``all``). The bars below are looser by the spread measured over seeds 0, 1 and 2 (the closing
note's table; ``RESNET_SUITE_SEEDS=0,1,2`` runs them all, ``RESNET_SUITE_REPORT=FILE`` appends
each task's figures as a JSON line, ``scripts/task_table.py FILE`` makes the table). The trunk
is *seeded random* ResNet18 weights (no ImageNet weights offline), so absolute accuracies are
modest and some tasks sit near chance for every method; what is tested is that the default
never does worse than the plain probe on the same images.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from resnet_bench.tasks import TASKS, UNTUNED, WRITERS, write_task
from tests.process.test_finetune import (
    ISA_MAX_DROP,
    ISA_MIN_AGREEMENT,
    TaskFigures,
    evaluate_bundle,
    int8_at_every_isa_level,
    run_default_finetune,
    show,
)

#: Per task: the served default may trail the probe by at most this (goal: 1 point)...
PER_TASK_MARGIN = 0.03
#: ...unless the gap is what chance gives two classifiers on the same images: a paired count
#: of held-out images only the probe got (losses) against those only the default got (wins),
#: failing when ``losses - wins > 2 * sqrt(losses + wins)`` (a two-sigma sign test). Near
#: chance (shapes on random weights: probe 31-36%) the two disagree on a third of the images
#: and a 4-image gap (3.3 points, seed 1) is one sigma.
PAIRED_SIGMAS = 2.0
#: The suite's mean (goal: no loss at all).
MEAN_MARGIN = 0.005
#: The served int8 model against the fp32 bundle on the same held-out images: a loss of at
#: most this. One-sided: near chance the two disagree on borderline images either way, and
#: int8 came out *ahead* by 4.2 points (ellipses, seed 1: 44.2% against 40.0%) and 3.3
#: (grey-marks, seed 2); the largest loss over seeds 0-2 was 1.7 points (shapes, seed 0).
MAX_INT8_DROP = 0.03
#: ...or two held-out images, whichever is more: the untuned tasks hold out 60 images, where
#: one image is 1.7 points (int8 lost 2 of 60 on colours and on stray-lines-few, seed 2).
MAX_INT8_DROP_IMAGES = 2
SEEDS = [int(s) for s in os.environ.get("RESNET_SUITE_SEEDS", "0").split(",")]
#: ``suite`` (the seven tasks, what ``make test`` runs), ``untuned`` (issue 34's tasks no
#: choice of the recipe was tuned on) or ``all``.
TASK_SETS = {"suite": WRITERS, "untuned": UNTUNED, "all": TASKS}
TASK_SET = TASK_SETS[os.environ.get("RESNET_SUITE_TASKS", "suite")]
#: The second fine-tuned model whose int8 fidelity is checked at every instruction-set level
#: (the digits test checks the first): gratings, where ``layer4`` is retrained, so the int8
#: graph's last block is one calibration has not seen before. The default runtime only, to
#: keep ``make test`` short; ``RESNET_SUITE_ISA_RUNTIMES=openvino,torch`` adds torch.
ISA_TASK = "stripes"
ISA_RUNTIMES = tuple(os.environ.get("RESNET_SUITE_ISA_RUNTIMES", "openvino").split(","))
#: Stripes' int8 agreement with fp32 at every level, per runtime, on 120 held-out images.
#: OpenVINO (the default): 98.3-99.2% over seeds 0-2, the same at every level; held to the
#: digits test's bar (97.5%: two images of margin). Torch: 94.2-98.3% over the seeds (seed
#: 2: 95.0% below VNNI, where x86's qconfig quantises activations to 7 bits against the
#: saturation of its u8 x s8 multiply-adds, and 94.2% with VNNI), its accuracy within 0.8
#: points (-1.7 to +0.8); it is never the default runtime. Its bar is two images below its
#: lowest. The accuracy drop bar is the digits test's for both: 2 points.
ISA_MIN_AGREEMENT_BY_RUNTIME = {"openvino": ISA_MIN_AGREEMENT, "torch": 0.925}


def _record(row: dict[str, object], seed: int) -> None:
    target = os.environ.get("RESNET_SUITE_REPORT")
    if target:
        with Path(target).open("a") as out:
            out.write(json.dumps({"seed": seed, **row}) + "\n")


@pytest.mark.timeout(1800)  # ~25 s a task alone; several times that on cores in use
@pytest.mark.parametrize("seed", SEEDS)
def test_default_recipe_holds_against_the_probe_on_every_task(
    seed: int, weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite: list[TaskFigures] = []
    isa_files: list[Path] = []
    for task in sorted(TASK_SET):
        data = write_task(task, tmp_path / task / "data", seed)
        bundle = tmp_path / task / "bundle"
        summary = run_default_finetune(
            data.train, bundle, tmp_path / task, weights_file, capsys, seed=seed
        )
        figures = evaluate_bundle(
            task, summary, bundle, data.test, tmp_path / task, weights_file, capsys
        )
        show(figures, capsys)
        _record(asdict(figures), seed)
        suite.append(figures)
        if task == ISA_TASK:
            isa_files = sorted(data.test.rglob("*.png"))
    isa = []
    with capsys.disabled():  # every task recorded first, so a miss here loses no row
        bundle, cache = tmp_path / ISA_TASK / "bundle", tmp_path / ISA_TASK / "cache"
        if isa_files:
            isa = int8_at_every_isa_level(ISA_RUNTIMES, bundle, cache, isa_files)
    for level in isa:
        _record({"isa_task": ISA_TASK, **asdict(level)}, seed)
    for figures in suite:
        for probe, wins, losses in (
            (figures.probe_test_accuracy, figures.wins, figures.losses),
            (figures.textbook_test_accuracy, figures.textbook_wins, figures.textbook_losses),
        ):
            behind = probe - figures.int8_http_test_accuracy
            noise = PAIRED_SIGMAS * math.sqrt(wins + losses)
            assert behind <= PER_TASK_MARGIN or losses - wins <= noise, figures
        drop_bar = max(MAX_INT8_DROP, (MAX_INT8_DROP_IMAGES + 0.5) / figures.test_images)
        assert figures.fp32_test_accuracy - figures.int8_http_test_accuracy <= drop_bar, figures
    for level in isa:
        assert level.agreement >= ISA_MIN_AGREEMENT_BY_RUNTIME[level.runtime], level
        assert level.drop <= ISA_MAX_DROP, level
    served = sum(f.int8_http_test_accuracy for f in suite) / len(suite)
    probe = sum(f.probe_test_accuracy for f in suite) / len(suite)
    textbook = sum(f.textbook_test_accuracy for f in suite) / len(suite)
    with capsys.disabled():
        print(
            f"\nsuite mean (seed {seed}): served int8 {served:.3f}, probe {probe:.3f}, "
            f"textbook probe {textbook:.3f}"
        )
    assert served >= probe - MEAN_MARGIN
    assert served >= textbook - MEAN_MARGIN
