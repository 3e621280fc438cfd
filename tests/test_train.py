"""The real `train` on synthetic data (tiny, CPU): it must learn to classify AND to localize."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inspectd.imageio import read_rgb
from inspectd.model.deployable import load_model, read_metadata
from inspectd.pipeline.engine import Predictor
from inspectd.pipeline.postprocess import probability, upsample
from inspectd.toolkit.dataset import scan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def held_out(trained, synth_test):
    """Predictions of the trained model on the held-out synthetic set (another seed)."""
    model = load_model(trained.model_path)
    data = scan(synth_test)
    images = [read_rgb(it.path) for it in data.items]
    return data, images, Predictor(model, batch_size=8).predict(images)


def test_learns_to_classify(held_out):
    from sklearn.metrics import roc_auc_score

    data, _, preds = held_out
    auc = roc_auc_score(data.labels, [p.score for p in preds])
    assert auc >= 0.9, f"held-out image ROC-AUC {auc:.3f}"


def _masks(data):
    import cv2

    return [cv2.imread(str(it.mask), cv2.IMREAD_GRAYSCALE) > 0 for it in data.items if it.label == 1]


def test_probability_map_localizes(held_out):
    """The CAM is coarse (6x6 cells at 96x96, stride 16), so the floors are relative to chance:

    - pointing game: the map's peak lands on the defect (dilated by one CAM cell, the map's own
      resolution) in >= 60 % of defect images; a random point would hit it ~ the dilated defect
      area fraction of the time (measured below, about 15-25 %);
    - IoU of the map thresholded at its best value (over the same grid evaluate uses) is at least
      twice that of the trivial "whole image" mask, whose IoU is the defect area fraction.
    """
    import cv2

    from inspectd.toolkit.evaluate import THRESHOLDS
    from inspectd.toolkit.scoring import iou_dice

    data, _, preds = held_out
    defect_preds = [p for it, p in zip(data.items, preds) if it.label == 1]
    masks = _masks(data)
    cell = 96 // 6
    hits, chance, probs = [], [], []
    for pred, mask in zip(defect_preds, masks):
        prob = upsample(probability(pred.cam_logits), mask.shape[1], mask.shape[0])
        probs.append(prob)
        near = cv2.dilate(mask.astype(np.uint8), np.ones((2 * cell + 1, 2 * cell + 1), np.uint8)) > 0
        y, x = np.unravel_index(np.argmax(prob), prob.shape)
        hits.append(bool(near[y, x]))
        chance.append(near.mean())
    assert np.mean(hits) >= max(0.6, 2 * np.mean(chance)), (np.mean(hits), np.mean(chance))
    baseline = np.mean([m.mean() for m in masks])
    best_iou = max(np.mean([iou_dice(p >= t, m)[0] for p, m in zip(probs, masks)]) for t in THRESHOLDS)
    assert best_iou >= 2 * baseline, (best_iou, baseline)


def test_good_images_score_lower_than_defects(held_out):
    data, _, preds = held_out
    scores = np.array([p.score for p in preds])
    assert np.median(scores[data.labels == 1]) > np.median(scores[data.labels == 0])


def test_outputs_written_next_to_model(trained):
    history = json.loads(trained.history_path.read_text())
    assert len(history["epochs"]) == 12
    # The kept epoch is the best by validation ROC-AUC, ties broken by the lower validation loss.
    best = max(history["epochs"], key=lambda e: (round(e["val_auc"], 6), -e["val_loss"]))
    assert history["best_epoch"] == best["epoch"] == trained.best_epoch
    assert {"loss", "val_loss", "val_auc", "accuracy"} <= set(history["epochs"][0])
    assert trained.curves_path.stat().st_size > 10_000
    assert trained.curves_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metadata_describes_training(trained):
    meta = read_metadata(trained.model_path)
    assert meta["format"] == "inspectd.model/1"
    assert meta["backbone"] == "efficientnetv2b0" and meta["stride"] == 16
    assert meta["input"] == {
        "width": 96,
        "height": 96,
        "channels": 3,
        "channel_order": "RGB",
        "range": "0-255",
        "preprocessing": "inside the model: feed RGB 0..255 float",
    }
    assert meta["cam"] == {"height": 6, "width": 6}
    assert meta["thresholds"]["score"] == 0.5
    assert meta["pooling"] == {"kind": "gap", "param": None}
    # The mask rule's parameter: the best of the searched curve on the validation masks, also thresholds.mask.
    rule, search = meta["mask_rule"], meta["mask_rule_search"]
    assert rule["kind"] == "probability" and search["how"].startswith("best mean defect IoU")
    curve = {float(k): v for k, v in search["curve"].items()}
    assert rule["param"] in curve and curve[rule["param"]] == max(curve.values())
    assert len(set(curve.values())) > 1  # the search saw a difference between parameters
    assert meta["thresholds"]["mask"] == rule["param"]
    train = meta["training"]
    assert train["train_counts"]["ok"] + train["val_counts"]["ok"] == 120
    assert train["weights"] == "none" and train["epochs"] == 12
    assert meta["inspectd_version"]


def test_recorded_val_metrics_match_an_independent_computation(tf, trained, synth_train):
    """metrics.val in the model file (and history.json) is what its name says: sklearn's ROC-AUC and AP of the
    saved model's scores on the validation split (the seed-0 20 % of the training folder), recomputed here by
    calling the saved model directly, and the accuracy at the 0.5 threshold."""
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

    from inspectd.toolkit.dataset import stratified_split

    meta = read_metadata(trained.model_path)
    recorded = meta["metrics"]["val"]
    assert json.loads(trained.history_path.read_text())["val"] == recorded
    _, val = stratified_split(scan(synth_train), 0.2, 0)
    assert val.counts() == meta["training"]["val_counts"]
    model = load_model(trained.model_path)
    images = np.stack([read_rgb(it.path) for it in val.items]).astype(np.float32)
    assert images.shape[1:3] == (96, 96)  # the model's input size: no resize in between
    scores = model.model(images, training=False)["score"].numpy().astype(np.float64)
    labels = np.array([it.label for it in val.items])
    assert recorded["roc_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-3)
    assert recorded["average_precision"] == pytest.approx(average_precision_score(labels, scores), abs=1e-3)
    assert recorded["accuracy"] == pytest.approx(accuracy_score(labels, scores >= 0.5), abs=1e-6)
    # The easy synthetic set is learnt: a recorded value that merely lies in [0, 1] would not do.
    assert recorded["roc_auc"] >= 0.8, recorded
