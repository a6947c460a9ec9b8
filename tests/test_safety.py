"""The host's safety-checker verdict equals diffusers' StableDiffusionSafetyChecker.forward
(what StableDiffusionPipeline calls), including its rounding of scores to 3 decimals,
on the exported graph's outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from runtime.safety import flags_from_outputs, nsfw_flags

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from export.graphs import GraphJob, SafetyChecker, export_onnx, ort_session, sample_inputs  # noqa: E402
from runtime.bundle import graph_spec  # noqa: E402


def _cosines(checker, clip_input):
    with torch.no_grad():
        emb = checker.visual_projection(checker.vision_model(clip_input)[1])
        n = torch.nn.functional.normalize
        return n(emb) @ n(checker.special_care_embeds).T, n(emb) @ n(checker.concept_embeds).T


# (special score offset of image 0, concept score offset of image 0): what the rounding
# decides. Scores are cosine - threshold; thresholds are set to cosine - offset.
# The last two: image 0's flag under forward (diffusers), and under forward_onnx (the
# graph's own has_nsfw, unrounded, what the runtime used before).
CASES = {
    "concept just above 0 (rounds to 0)": (-0.2, 0.0003, False, True),
    "concept above 0.0005 (rounds up)": (-0.2, 0.0007, True, True),
    "special just above 0: no adjustment": (0.0003, -0.006, False, True),
    "special above 0.0005: +0.01 flags": (0.0007, -0.006, True, True),
    "clearly negative": (-0.2, -0.2, False, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_flags_equal_diffusers_forward(demo_components, tmp_path, case):
    special_off, concept_off, flagged, flagged_unrounded = CASES[case]
    checker = copy.deepcopy(demo_components.safety_checker).eval()
    (clip_input,) = sample_inputs("safety_checker", demo_components, 2, seed=5)
    special_cos, cos = _cosines(checker, clip_input)
    with torch.no_grad():  # image 0 sits on the boundary; image 1 far below it
        checker.special_care_embeds_weights[:] = special_cos[0] - special_off
        checker.special_care_embeds_weights[1:] = 1.0
        checker.concept_embeds_weights[:] = 1.0
        checker.concept_embeds_weights[3] = cos[0, 3] - concept_off
        _, want = checker(clip_input, np.zeros((2, 8, 8, 3)))  # forward: diffusers' verdict
    job = GraphJob(graph_spec("safety_checker", demo_components.hidden),
                   SafetyChecker(checker).eval(), (clip_input,))
    export_onnx(job, tmp_path / "s.onnx", 17)
    sess = ort_session(tmp_path / "s.onnx")
    out = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {"clip_input": clip_input.numpy()}), strict=True))
    assert flags_from_outputs(out) == list(want), case
    assert want[0] is flagged and bool(out["has_nsfw"][0]) is flagged_unrounded


def test_rounding_is_what_differs_from_forward_onnx():
    """A score of 0.0003 flags under forward_onnx (no rounding), not under forward."""
    concept = np.full((1, 17), -1.0, np.float32)
    concept[0, 0] = 0.0003
    assert nsfw_flags(concept, np.full((1, 3), -1.0, np.float32)) == [False]
    concept[0, 0] = 0.0006
    assert nsfw_flags(concept, np.full((1, 3), -1.0, np.float32)) == [True]


def test_old_bundles_use_the_graphs_flags():
    assert flags_from_outputs({"has_nsfw": np.array([True, False]),
                               "concept_scores": np.zeros((2, 17), np.float32)}) == [True, False]


def test_a_bundle_from_before_special_scores_still_runs(tmp_path):
    """Its checker graph has has_nsfw and concept_scores only: loaded, and its flags used."""
    import json
    import shutil

    import onnx

    from runtime.bundle import MANIFEST, demo_bundle
    from runtime.integrity import file_hashes
    from runtime.pipeline import Pipeline

    bundle = tmp_path / "old"
    shutil.copytree(demo_bundle(), bundle)
    model = onnx.load(str(bundle / "safety_checker.onnx"))
    del model.graph.output[2]  # special_scores
    onnx.save(model, str(bundle / "safety_checker.onnx"))
    m = json.loads((bundle / MANIFEST).read_text())
    g = m["graphs"]["safety_checker"]
    g["outputs"] = g["outputs"][:2]
    g["sha256"], g["xxh3"] = file_hashes(bundle / "safety_checker.onnx")
    (bundle / MANIFEST).write_text(json.dumps(m))
    with Pipeline(bundle, "ort-cpu") as pipe:
        r = pipe("x", steps=1, seed=0)
    assert r.safety_checked and r.nsfw == [False]
