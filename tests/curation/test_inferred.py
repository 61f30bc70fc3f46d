"""Inferred attributes on an ingested corpus (tiny CLIP built in the test, real face detector)
and the generations audit catching a group erased from a model's outputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffcurate.config import AttributeSettings
from diffcurate.curation import generations as gen_module
from diffcurate.curation.generations import (
    GenerationsAuditConfig,
    audit_model_generations,
    draw_prompts,
)
from diffcurate.curation.inferred import ImageLabeller, infer_dataset
from diffcurate.curation.measure import MeasureConfig
from diffcurate.curation.zero_shot import ZeroShotClassifier, zero_shot_attributes
from diffcurate.demo.writers import SampleFile
from diffcurate.metrics.inferred_attributes import UNCERTAIN, ZeroShotRule
from diffcurate.models.clip_embedder import ClipEmbedder
from diffcurate.models.faces import FaceDetector, load_face_detector
from diffcurate.storage.attributes import read_attributes
from diffcurate.storage.lance_store import LanceStore

pytestmark = pytest.mark.usefixtures("prefect_harness")

PROMPTS = {"subject": {"person": ["a photo of a person", "a portrait"], "object": "a cup"}}


def _face(size: int = 128) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((size, size))


def _coffee(size: int = 128) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.coffee()).resize((size, size))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_clip):
    from diffcurate.config import IngestSettings
    from diffcurate.demo.writers import write_manifest
    from diffcurate.flows.ingest import IngestParams, ingest_flow

    root = tmp_path_factory.mktemp("inferred")
    face, cup = _jpeg(_face()), _jpeg(_coffee())
    samples = [
        SampleFile("f0", face, "jpg", "a woman astronaut in a suit", {}),
        SampleFile("f1", _jpeg(_face().rotate(3)), "jpg", "portrait of a man", {}),
        SampleFile("c0", cup, "jpg", "a cup of coffee", {}),
        SampleFile("c1", _jpeg(_coffee().rotate(3)), "jpg", "a man and a woman drink coffee", {}),
    ]
    write_manifest(samples, root / "m.parquet")
    ws = root / "ws"
    ingest_flow(IngestParams(source=root / "m.parquet", dataset="mix", workspace=ws,
                             clip=tiny_clip, ingest=IngestSettings(), progress=False))  # fmt: skip
    return ws


def test_zero_shot_classifier_matches_hand_computed_cosines(tiny_clip):
    settings = AttributeSettings(zero_shot=PROMPTS)
    embedder = ClipEmbedder(tiny_clip)
    clf = ZeroShotClassifier(tiny_clip, zero_shot_attributes(settings), embedder=embedder,
                             rule=None)  # fmt: skip
    images = [_face(), _coffee(), _face(64)]
    img = embedder.embed_images(images).astype(np.float64)
    person = embedder.embed_texts(["a photo of a person", "a portrait"]).astype(np.float64)
    cup = embedder.embed_texts(["a cup"]).astype(np.float64)[0]
    # By hand: the person group is the renormalised mean of its two unit prompt embeddings.
    person = person.mean(0) / np.linalg.norm(person.mean(0))
    cup = cup / np.linalg.norm(cup)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    cos = np.stack([img @ person, img @ cup], axis=1)
    got = clf.label_images(images)["subject"]
    np.testing.assert_allclose(got.cosines, cos, atol=1e-5)
    # Default rule (scale 100, threshold 0.6): p = 1 / (1 + exp(-100 |cos_p - cos_c|)).
    p_best = 1 / (1 + np.exp(-100 * np.abs(cos[:, 0] - cos[:, 1])))
    np.testing.assert_allclose(got.confidence, p_best, rtol=1e-4)
    want = [("person" if c[0] > c[1] else "object") if p >= 0.6 else UNCERTAIN
            for c, p in zip(cos, p_best, strict=True)]  # fmt: skip
    assert got.labels == want
    # A threshold above every probability makes every label uncertain.
    above = ZeroShotRule(threshold=float(p_best.max()) + 1e-6)
    strict = ZeroShotClassifier(tiny_clip, zero_shot_attributes(settings), above, embedder)
    assert strict.label_images(images)["subject"].labels == [UNCERTAIN] * 3
    # The fingerprint covers the prompts and the rule.
    assert clf.fingerprint("subject") != strict.fingerprint("subject")


def test_infer_dataset_stores_every_source_with_provenance(corpus, tiny_clip):
    store = LanceStore(str(corpus / "lancedb"))
    settings = AttributeSettings(
        zero_shot=PROMPTS, threshold=0.0,
        captions={"gender": {"woman": ["woman"], "man": ["man"]}},
    )  # fmt: skip
    report = infer_dataset(store, "mix", settings, tiny_clip, "run-1")
    by_name = {a.attribute: a for a in report.attributes}
    assert set(by_name) == {"gender", "subject", "faces"} and report.skipped == []
    assert by_name["gender"].counts == {"man": 1, "multiple": 1, "unknown": 1, "woman": 1}
    assert by_name["faces"].counts == {"0": 2, "1": 2}
    assert by_name["faces"].model.startswith("opencv-")
    assert by_name["subject"].model == "diffcurate-test-clip@tiny-clip.pt"
    frame, prov = read_attributes(store, "mix")
    keys = dict(zip(store.read("samples", "mix", columns=["sample_id", "key"]).column(
        "sample_id").to_pylist(), store.read("samples", "mix", columns=["sample_id", "key"])
        .column("key").to_pylist(), strict=True))  # fmt: skip
    got = {keys[r["sample_id"]]: (r["gender"], r["faces"]) for r in frame.to_dict("records")}
    assert got == {"f0": ("woman", "1"), "f1": ("man", "1"), "c0": ("unknown", "0"),
                   "c1": ("multiple", "0")}  # fmt: skip
    assert prov["subject"].source == "zero-shot"
    assert "inferred (faces) by opencv-" in prov["faces"].describe()
    # Zero-shot labels from ingest's stored embeddings equal those of freshly embedded images.
    clf = ZeroShotClassifier(tiny_clip, zero_shot_attributes(settings), rule=None)
    rows = store.read("samples", "mix", columns=["sample_id", "image"]).to_pylist()
    fresh = clf.label_images([Image.open(io.BytesIO(r["image"])) for r in rows])["subject"]
    stored = dict(zip(frame["sample_id"], frame["subject"], strict=True))
    assert [stored[r["sample_id"]] for r in rows] == fresh.labels
    # Computed once: the same settings write nothing the second time.
    again = infer_dataset(store, "mix", settings, tiny_clip, "run-2")
    assert all(a.written == 0 for a in again.attributes)


def test_zero_shot_without_clip_is_refused(corpus):
    from diffcurate.config import ClipSettings

    store = LanceStore(str(corpus / "lancedb"))
    with pytest.raises(ValueError, match="CLIP checkpoint"):
        infer_dataset(store, "mix", AttributeSettings(zero_shot=PROMPTS), ClipSettings(), "r")


class _Model:
    """Stands in for a diffusion model: the audit only asks whether it is conditional."""

    def __init__(self, name: str, conditional: bool = False) -> None:
        self.name, self.conditional, self.text_encoder = name, conditional, None


def test_generations_audit_catches_a_group_erased_from_the_outputs(monkeypatch):
    """Before: half the generations show a face. After: none. Same seed for both models."""
    face = torch.from_numpy(np.asarray(_face(), np.float32) / 127.5 - 1).permute(2, 0, 1)
    cup = torch.from_numpy(np.asarray(_coffee(), np.float32) / 127.5 - 1).permute(2, 0, 1)
    seeds = []

    def fake_generate(model, n, *, seed, **_):
        seeds.append(seed)
        if model.name == "before":
            return torch.stack([face if i % 2 == 0 else cup for i in range(n)])
        return torch.stack([cup] * n)

    monkeypatch.setattr(gen_module, "generate", fake_generate)
    labeller = ImageLabeller(classifier=None, detector=load_face_detector())
    assert isinstance(labeller.detector, FaceDetector)
    config = GenerationsAuditConfig(generations=40)
    report = audit_model_generations(_Model("before"), _Model("after"), config,
                                     MeasureConfig(seed=7), [], labeller)  # fmt: skip
    assert seeds == [10, 10]  # one keyed noise stream for both models
    (faces,) = report.result.attributes
    shares = {g.group: (g.n_before, g.n_after) for g in faces.groups}
    assert shares == {"0": (20, 40), "1": (20, 0)}
    assert faces.lowest_group == "1" and faces.violation and not report.result.passed
    assert "faces" in report.inferred_by and report.prompts == ""
    # The same model twice passes.
    same = audit_model_generations(_Model("before"), _Model("before"), config,
                                   MeasureConfig(seed=7), [], labeller)  # fmt: skip
    assert same.result.passed


def test_prompts_are_drawn_from_distinct_captions_and_nothing_to_infer_is_reported():
    drawn = draw_prompts(["b", "a", "a", "", None, "c"], 6, seed=0)
    assert len(drawn) == 6 and set(drawn) <= {"a", "b", "c"}
    assert drawn == draw_prompts(["c", "b", "a"], 6, seed=0)
    with pytest.raises(ValueError):
        draw_prompts(["", " "], 3, seed=0)
    none = ImageLabeller.from_settings(AttributeSettings(zero_shot=PROMPTS, faces=False), None)
    assert not none.available and none.skipped == ["zero-shot: no CLIP checkpoint configured"]
    report = audit_model_generations(_Model("a"), _Model("b"), GenerationsAuditConfig(),
                                     MeasureConfig(), [], none)  # fmt: skip
    assert report.result is None and report.skipped
