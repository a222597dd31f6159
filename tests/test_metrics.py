import math

import numpy as np
import torch

from hierseg.labels import Hierarchy
from hierseg.metrics import ConfusionMatrix, EvalMetrics, GroupConfusion, HierarchyConsistency
from tests.dist_utils import run_ranks


def _numpy_confusion(pred, target, c):
    m = np.zeros((c, c), dtype=np.int64)
    for t, p in zip(target.ravel().tolist(), pred.ravel().tolist()):
        if t != -1:
            m[t, p] += 1
    return m


def _case(seed, n=2000, c=12):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n,), generator=g)
    target[target == 4] = 5  # soma has no data
    pred = torch.where(torch.rand(n, generator=g) < 0.6, target, torch.randint(0, c, (n,), generator=g))
    pred[pred == 4] = 2
    target[torch.rand(n, generator=g) < 0.2] = -1
    return pred, target


def test_confusion_matches_independent_count():
    """Rows = target, columns = prediction, uncertain skipped, int64."""
    pred, target = _case(0)
    cm = ConfusionMatrix(12).update(pred.view(40, 50), target.view(40, 50))
    ref = _numpy_confusion(pred.numpy(), target.numpy(), 12)
    assert cm.matrix.dtype == torch.int64
    assert np.array_equal(cm.matrix.numpy(), ref)
    assert cm.num_valid == int((target != -1).sum())


def test_iou_dice_accuracy_and_nan_for_absent_class():
    """IoU/Dice per class from counts; soma (absent everywhere) is NaN and miou ignores it."""
    pred, target = _case(1)
    cm = ConfusionMatrix(12).update(pred, target)
    m = _numpy_confusion(pred.numpy(), target.numpy(), 12).astype(float)
    tp, rows, cols = np.diag(m), m.sum(1), m.sum(0)
    with np.errstate(invalid="ignore"):
        iou, dice = tp / (rows + cols - tp), 2 * tp / (rows + cols)
    assert math.isnan(cm.iou()[4]) and math.isnan(cm.dice()[4])
    np.testing.assert_allclose(cm.iou().numpy(), iou, equal_nan=True)
    np.testing.assert_allclose(cm.dice().numpy(), dice, equal_nan=True)
    assert math.isclose(cm.miou(), np.nanmean(iou))
    assert math.isclose(cm.accuracy(), tp.sum() / m.sum())


def test_empty_matrix_gives_nan_not_zero():
    """No valid pixel: accuracy and miou are NaN, never a misleading 0."""
    cm = ConfusionMatrix(3).update(torch.zeros(5, dtype=torch.long), torch.full((5,), -1))
    assert math.isnan(cm.accuracy()) and math.isnan(cm.miou())


def test_group_confusion_and_consistency():
    """Per-group binary counts against LUT targets; consistency = fine argmax inside positive groups."""
    lut = Hierarchy.default().lut()
    y = torch.tensor([[[2, 6, -1, 10]]])  # dendrite, myelin, uncertain, mitochondria
    pred_fine = torch.tensor([[[3, 0, 5, 10]]])  # axon (neuron ok), ECS (not myelin), -, mito
    prob = torch.zeros(1, 5, 1, 4)
    prob[0, 0, 0, 0] = 0.9  # neuron_part positive at pixel 0
    prob[0, 2, 0, 1] = 0.9  # myelin_related positive at pixel 1
    prob[0, 1, 0, 3] = 0.9  # glia (wrong) at pixel 3
    gc = GroupConfusion(lut).update(prob, y)
    # neuron_part: px0 tp; px1, px3 tn
    assert gc.counts[0].tolist() == [[2, 0], [0, 1]]
    # organelle: px3 target 1 predicted 0
    assert gc.counts[3].tolist() == [[2, 0], [1, 0]]
    assert gc.iou()[0] == 1.0 and gc.iou()[3] == 0.0 and math.isnan(gc.iou()[4])
    hc = HierarchyConsistency(lut)
    hc.update(pred_fine, prob, y)
    assert hc.counts.tolist() == [1, 3]  # only pixel 0: axon is in neuron_part, predicted positive


def _metrics_rank(rank, world):
    pred, target = _case(10 + rank)
    cm = ConfusionMatrix(12).update(pred, target).all_reduce()
    lut = Hierarchy.default().lut()
    em = EvalMetrics(12, [lut])
    g = torch.Generator().manual_seed(rank)
    pred_fine = torch.randn(1, 12, 8, 8, generator=g).argmax(1)
    em.update(pred_fine, [torch.rand(1, 5, 8, 8, generator=g)], target[:64].view(1, 8, 8))
    local = [t.clone() for t in em._tensors()]
    em.all_reduce()
    return cm.matrix, local, em._tensors()


def test_all_reduce_sums_counts_over_two_gloo_ranks():
    """Counts summed over 2 real gloo ranks equal the counts of both ranks' data together."""
    r0, r1 = run_ranks(2, _metrics_rank)
    ref = ConfusionMatrix(12)
    for rank in range(2):
        ref.update(*_case(10 + rank))
    assert torch.equal(r0[0], ref.matrix) and torch.equal(r1[0], ref.matrix)
    for a, b, total0, total1 in zip(r0[1], r1[1], r0[2], r1[2]):
        assert torch.equal(a + b, total0) and torch.equal(total0, total1)
