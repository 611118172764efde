"""FinetunedClassifier: embedkit.finetune as a scikit-learn classifier over raw texts (tiny backbones)."""
import pickle

import numpy as np
import pytest
from finetune_support import LABELS, TEXTS, register
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.utils import estimator_checks

import embedkit
from embedkit.errors import DatasetError, InvalidUnfreezeError

FAST = dict(backbone="ft-tiny-text", unfreeze="all", epochs=3, batch_size=4, lr=1e-2, head_lr=0.1,
            validation=None)


@pytest.fixture(scope="module", autouse=True)
def tiny_plugin():
    register()


@pytest.fixture(scope="module")
def fitted():
    return embedkit.FinetunedClassifier(**FAST).fit(TEXTS, LABELS)


def test_parameters_are_stored_verbatim_and_nothing_loads_before_fit():
    clf = embedkit.FinetunedClassifier("does-not-exist", unfreeze="sideways", lr="fast")
    assert clf.get_params()["backbone"] == "does-not-exist" and clf.get_params()["lr"] == "fast"
    with pytest.raises(NotFittedError):
        clf.predict(["x"])
    with pytest.raises(embedkit.UnknownBackboneError):
        clf.fit(TEXTS, LABELS)


# scikit-learn's own checks skip estimators whose input is not a 2-D array (tags.input_tags.two_d_array
# is False: raw texts), so the API checks that do not fit on numeric matrices are run here by name.
API_CHECKS = ["check_estimator_cloneable", "check_estimator_tags_renamed", "check_valid_tag_types",
              "check_estimator_repr", "check_no_attributes_set_in_init", "check_get_params_invariance",
              "check_set_params", "check_parameters_default_constructible", "check_estimators_unfitted",
              "check_mixin_order"]


@pytest.mark.parametrize("check", API_CHECKS)
def test_scikit_learn_api_checks(check):
    getattr(estimator_checks, check)("FinetunedClassifier", embedkit.FinetunedClassifier(**FAST))


def test_fit_predict_proba_score(fitted):
    assert fitted.classes_.tolist() == ["neg", "pos"]
    assert fitted.backbone_.startswith("ft-tiny-text+ft-") and len(fitted.digest_) == 64
    assert [h["epoch"] for h in fitted.history_] == [1, 2, 3] and fitted.failures_ == []
    proba = fitted.predict_proba(TEXTS)
    assert proba.shape == (16, 2) and proba.dtype == np.float64 and np.allclose(proba.sum(1), 1.0)
    np.testing.assert_allclose(proba, fitted.model_.predict_proba(TEXTS))  # the saved Pipeline's own numbers
    pred = fitted.predict(TEXTS)
    assert pred.tolist() == fitted.classes_[proba.argmax(1)].tolist()
    assert fitted.score(TEXTS, LABELS) == pytest.approx(np.mean(pred == np.asarray(LABELS)))
    assert fitted.score(TEXTS, LABELS) >= 0.75  # chance is 0.5: the tuned words separate most of the toy set
    assert fitted.predict_proba([]).shape == (0, 2) and fitted.predict([]).shape == (0,)
    assert embedkit.get_backbone(fitted.backbone_).spec()["name"] == fitted.backbone_  # resolvable by name


def test_clone_and_pickle_round_trip_predict_the_same(fitted):
    restored = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(restored.predict_proba(TEXTS), fitted.predict_proba(TEXTS))
    assert restored.predict(TEXTS).tolist() == fitted.predict(TEXTS).tolist()
    twin = clone(fitted)
    assert not hasattr(twin, "model_") and twin.get_params() == fitted.get_params()
    again = twin.fit(TEXTS, LABELS)  # seeded: a refit of the clone gives the same weights and probabilities
    assert again.digest_ == fitted.digest_
    np.testing.assert_allclose(again.predict_proba(TEXTS), fitted.predict_proba(TEXTS), atol=1e-6)


def test_grid_search_over_learning_rate_and_unfreeze():
    grid = [{"lr": [1e-2], "unfreeze": ["all"]}, {"lr": [1e-4], "unfreeze": ["last:1"]}]
    search = GridSearchCV(embedkit.FinetunedClassifier(**{**FAST, "epochs": 1}), grid, cv=2)
    search.fit(TEXTS, LABELS)
    params = search.cv_results_["params"]
    assert [(p["lr"], p["unfreeze"]) for p in params] == [(1e-2, "all"), (1e-4, "last:1")]
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_params_ in params
    assert search.predict(TEXTS[:3]).tolist() == search.best_estimator_.predict(TEXTS[:3]).tolist()
    assert search.best_estimator_.get_params()["lr"] == search.best_params_["lr"]


def test_contrastive_objective_trains_setfit_pairs():
    clf = embedkit.FinetunedClassifier(**{**FAST, "objective": "contrastive", "iterations": 2, "epochs": 1,
                                          "unfreeze": "all"}).fit(TEXTS, LABELS)
    (epoch,) = clf.history_
    assert epoch["pairs"] == 2 * 2 * 16 and epoch["positives"] == epoch["negatives"] == 32
    assert clf.predict_proba(TEXTS).shape == (16, 2)
    assert clf.score(TEXTS, LABELS) >= 0.75
    batched = embedkit.FinetunedClassifier(**{**FAST, "objective": "contrastive", "loss": "in-batch", "iterations": 2,
                                              "epochs": 1, "unfreeze": "all", "batch_size": 2}).fit(TEXTS, LABELS)
    (epoch,) = batched.history_
    assert epoch["pairs"] == 2 * 16 and epoch["steps"] == 16  # 2 anchors per item, one per class in a batch
    assert batched.get_params()["loss"] == "in-batch" and batched.score(TEXTS, LABELS) >= 0.75


def test_bad_input_is_a_typed_error_before_training():
    clf = embedkit.FinetunedClassifier(**FAST)
    with pytest.raises(DatasetError, match="15 labels for 16 items"):
        clf.fit(TEXTS, LABELS[:-1])
    with pytest.raises(DatasetError, match="2 classes"):
        clf.fit(TEXTS, ["pos"] * 16)
    with pytest.raises(DatasetError, match="continuous"):
        clf.fit(TEXTS, np.linspace(0, 1, 16))
    with pytest.raises(DatasetError, match="1 of 16 labels are missing"):
        clf.fit(TEXTS, [1.0] * 8 + [float("nan")] + [2.0] * 7)
    with pytest.raises(DatasetError, match="missing"):
        clf.fit(TEXTS, ["pos"] * 8 + [None] + ["neg"] * 7)
    with pytest.raises(DatasetError, match="1-D"):
        clf.fit(TEXTS, np.zeros((16, 2)))
    with pytest.raises(TypeError, match="single string"):
        clf.fit("one text", ["pos"])
    with pytest.raises(InvalidUnfreezeError, match="3"):  # the tiny backbone has 3 blocks
        clone(clf).set_params(unfreeze="last:9").fit(TEXTS, LABELS)
    assert not hasattr(clf, "model_")


def test_bad_items_at_predict_are_listed(fitted):
    with pytest.raises(embedkit.InvalidInputError) as info:
        fitted.predict(["fine", None, b"\xff"])
    assert [(e.index, e.code) for e in info.value.errors] == [(1, "not_text"), (2, "invalid_utf8")]
