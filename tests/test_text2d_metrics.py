"""KID beside FID (experiments.image_metrics.FIDTracker) and the CLIP score (experiments.image_metrics.CLIPSimilarity) of the text-to-2D Scorer:
KID against an independent numpy computation of the unbiased polynomial-kernel MMD², seeded subsets, config
checks naming the field, and CLIPScore on a tiny random CLIP built here (nothing downloads)."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from experiments.image_metrics import ClassifierFeatures, CLIPSimilarity, FIDTracker, load_clip  # noqa: E402
from experiments.text2d import Scorer  # noqa: E402
from tests.tiny_sd import write_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLIP_SIZE = 32


def _features(dim: int) -> ClassifierFeatures:
    """Features = the first ``dim`` pixels of channel 0 (so the feature vectors are known exactly)."""
    return ClassifierFeatures(lambda x: x[:, 0].flatten(1)[:, :dim], dim)


def _images(n: int, mean: float, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)


def _numpy_kid(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD² with k(x, y) = (x·y/d + 1)³ on all pairs of two equal-size sets."""
    m, d = len(real), real.shape[1]
    k_rr, k_ff, k_rf = ((a @ b.T / d + 1) ** 3 for a, b in ((real, real), (fake, fake), (real, fake)))
    within = (k_rr.sum() - np.trace(k_rr) + k_ff.sum() - np.trace(k_ff)) / (m * (m - 1))
    return float(within - 2 * k_rf.sum() / m**2)


def test_kid_of_a_set_against_itself_is_near_zero_and_a_shifted_set_is_positive():
    reference = _images(256, 0.0, 0.3, 0)
    tracker = FIDTracker(_features(8), reference, kid_subset_size=100, kid_subsets=50)
    same, same_std = tracker.kid(reference)
    fresh, _ = tracker.kid(_images(256, 0.0, 0.3, 1))  # an independent draw of the same law
    shifted, shifted_std = tracker.kid(_images(256, 0.2, 0.3, 2))
    assert shifted > 0.05 and shifted > 10 * shifted_std
    assert abs(same) < 0.02 * shifted and abs(fresh) < 0.02 * shifted
    assert same_std > 0  # subsets of 100 of 256: the draws differ


def test_kid_on_all_pairs_matches_the_numpy_unbiased_mmd():
    dim, n = 8, 24
    reference, images = _images(n, 0.0, 0.3, 3), _images(n, 0.1, 0.4, 4)
    tracker = FIDTracker(_features(dim), reference, kid_subsets=7)  # kid_subset_size 1000 → min(1000, 24, 24)
    assert tracker.subset_size(n) == n
    kid, kid_std = tracker.kid(images)
    expected = _numpy_kid(reference[:, 0].flatten(1)[:, :dim].numpy(), images[:, 0].flatten(1)[:, :dim].numpy())
    assert kid == pytest.approx(expected, abs=1e-6) and expected > 0
    assert kid_std < 1e-9  # every subset holds all the images: only the summation order differs
    scores = tracker.scores(images)  # one feature pass for both: same numbers as the separate calls
    assert scores["kid"] == kid and scores["fid"] == pytest.approx(tracker.fid(images), rel=1e-12)


def test_kid_subset_size_is_capped_by_both_sets():
    tracker = FIDTracker(_features(4), _images(12, 0.0, 1.0, 5), kid_subset_size=10, kid_subsets=3)
    assert tracker.subset_size(8) == 8 and tracker.subset_size(40) == 10
    assert FIDTracker(_features(4), _images(6, 0.0, 1.0, 5)).subset_size(40) == 6
    kid, _ = tracker.kid(_images(2, 0.0, 1.0, 6))  # N = 2: the smallest set the unbiased estimator takes
    assert np.isfinite(kid)


def test_same_images_same_kid_and_the_callers_rng_is_untouched():
    reference, images = _images(64, 0.0, 0.3, 7), _images(48, 0.1, 0.3, 8)

    def make(seed: int) -> FIDTracker:
        return FIDTracker(_features(8), reference, kid_subset_size=20, kid_subsets=10, kid_seed=seed)

    tracker = make(0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = tracker.kid(images)
    assert torch.equal(torch.get_rng_state(), state)  # the subsets are drawn on a forked RNG
    assert tracker.kid(images) == first and make(0).kid(images) == first
    assert make(1).kid(images) != first  # subsets of 20 of 48 / 64: another seed, other subsets


def test_bad_kid_settings_fail_naming_the_field():
    with pytest.raises(ValueError, match="kid_subset_size"):
        FIDTracker(_features(4), _images(8, 0.0, 1.0, 9), kid_subset_size=1)
    with pytest.raises(ValueError, match="kid_subsets"):
        FIDTracker(_features(4), _images(8, 0.0, 1.0, 9), kid_subsets=0)
    for override, field in (("task.eval.kid_subset_size=1", "task.eval.kid_subset_size"),
                            ("task.eval.kid_subset_size=all", "task.eval.kid_subset_size"),
                            ("task.eval.kid_subsets=0", "task.eval.kid_subsets")):
        with pytest.raises(ValueError, match=field):
            Scorer.check(_config(override))
    Scorer.check(_config())  # the presets' defaults pass


def _config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["experiment=table4_shapes", "logger=none", *overrides])


# --- CLIP score ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIPModel (32 px images, 8-d embeddings) with the PIL image processor and the byte-level
    BPE tokenizer of tests.tiny_sd, saved as a model directory."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    root = tmp_path_factory.mktemp("clip")
    tokenizer = write_tokenizer(root)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_hidden_layers=1, max_position_embeddings=77, pad_token_id=eos, eos_token_id=eos,
                         bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>")),
        vision_config=dict(image_size=CLIP_SIZE, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_attention_heads=2, num_hidden_layers=1),
        projection_dim=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(root)
    CLIPImageProcessorPil(size={"shortest_edge": CLIP_SIZE},
                          crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}).save_pretrained(root)
    return root


def _independent_cosines(path: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """cos(E_img, E_txt) per pair from the CLIPModel's own towers and projections; the image normalisation by
    hand ((uint8/255 − mean)/std: the images are already CLIP's size, so resize and crop are identities)."""
    model, processor = load_clip(path)
    ip = processor.image_processor
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round() / 255
    pixels = (pixels - torch.tensor(ip.image_mean).view(1, 3, 1, 1)) / torch.tensor(ip.image_std).view(1, 3, 1, 1)
    tokens = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels.float()).pooler_output)
        text = model.text_projection(model.text_model(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"]).pooler_output)
    return torch.nn.functional.cosine_similarity(image, text, dim=-1)


def test_clip_score_matches_an_independent_computation(tiny_clip):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, CLIP_SIZE, CLIP_SIZE, generator=g) * 2 - 1
    prompts = ["a red circle", "a blue square", "the cat", "a dog", "the green triangle", "cat and dog"]
    cosines = _independent_cosines(tiny_clip, images, prompts)
    similarity = CLIPSimilarity(tiny_clip, batch_size=4)  # two update batches
    for i in range(len(prompts)):  # one pair: torchmetrics' score is 100 · max(cos, 0)
        assert similarity.score(images[i:i + 1], prompts[i:i + 1]) == pytest.approx(
            100 * max(float(cosines[i]), 0.0), abs=1e-3)
    # a set: torchmetrics clamps the mean, max(100 · mean cos, 0) (= mean of 100 · max(cos, 0) when all cos > 0)
    assert similarity.score(images, prompts) == pytest.approx(max(100 * float(cosines.mean()), 0.0), abs=1e-3)
    assert (cosines < 0).any() and (cosines > 0).any()  # both branches of the clamp are exercised above


def test_missing_or_invalid_clip_path_fails_naming_the_field(tiny_clip, tmp_path):
    for path in (tmp_path / "missing", tmp_path):  # nothing there / a directory without a CLIP model
        with pytest.raises(ValueError, match="task.eval.clip_path"):
            Scorer.check(_config(f"task.eval.clip_path={path}"))
        with pytest.raises(FileNotFoundError, match="no CLIP model directory"):
            load_clip(path)
    Scorer.check(_config(f"task.eval.clip_path={tiny_clip}"))


def test_scorer_rows_carry_kid_and_clip_score(tiny_clip, tiny_shapes_prior, tmp_path):
    """The Scorer on a tiny random ShapesWorld prior: kid, kid_std (vs DDIM), kid_true (vs renders) beside the
    FIDs, clip_score with task.eval.clip_path set; the same images score the same."""
    from experiments.text2d import build_setup

    prior, classifier = tiny_shapes_prior
    cfg = _config(f"prior.path={prior}", f"prior.classifier={classifier}",
                  'task.prompts=["a red circle","a blue square"]', "task.images_per_prompt=2",
                  "task.eval.reference_per_prompt=3", "task.eval.reference_steps=2",
                  f"task.eval.cache_dir={tmp_path / 'cache'}", "guidance=t2d_ddim", f"task.eval.clip_path={tiny_clip}")
    scorer = Scorer(cfg, build_setup(cfg))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    row = scorer(images)
    assert {"fid", "kid", "kid_std", "fid_true", "kid_true", "clip_score", "prompt_accuracy"} <= set(row)
    assert all(np.isfinite(row[k]) for k in ("kid", "kid_std", "kid_true", "clip_score")) and row["kid_std"] >= 0
    assert scorer.fid.subset_size(4) == 4 and scorer(images) == row
