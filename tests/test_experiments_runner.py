"""``dpfa run`` / ``dpfa figs`` (issue 9): the quick accountants and language_model configs end to end (the CI
runs), resumability, clear refusals, the data loaders, the ViT under the engine and the textbook baseline's
exactness. About 30 s on 2 CPU cores."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dpfa.cli import main
from dpfa.errors import ConfigError, DPFAError
from dpfa.experiments import run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "experiments" / "configs"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_reference import clipped_mean, per_example_grads  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap over SDPA on a CPU


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """The two CI configs, --quick, into one folder (shared by the tests below)."""
    out = tmp_path_factory.mktemp("results")
    runs = {name: run_config(CONFIGS / f"{name}.toml", quick=True, device="cpu", out_dir=out, progress=False,
                             command=f"dpfa run experiments/configs/{name}.toml --quick")
            for name in ("accountants", "language_model")}
    return out, runs


def _provenance(results):
    for key in ("config", "environment", "git", "device", "seeds", "runs", "cells", "summary", "command"):
        assert key in results, key
    assert results["device"] == "cpu" and results["environment"]["device"] == "cpu"
    assert "commit" in results["git"]


def test_quick_accountants(quick_results):
    out, runs = quick_results
    r = runs["accountants"]
    assert r.json_path == out / "accountants_quick.json" and r.markdown_path.is_file()
    results = json.loads(r.json_path.read_text())
    _provenance(results)
    assert results["summary"]["checks"]["prv_pld_agree"] and results["summary"]["checks"]["tight_below_rdp"]
    curves = [c for k, c in results["cells"].items() if k != "attention_heads"]
    assert {c["accountant"] for c in curves} == {"rdp", "prv", "pld"}
    for c in curves:
        assert c["epsilon"] == sorted(c["epsilon"])  # more steps, more epsilon
    heads = results["cells"]["attention_heads"]
    w, imp = heads["weights"], heads["importance"]
    assert imp[0] < heads["uniform"][0] < imp[-1]  # the most important head gets the least noise
    # the importance split keeps sum_h 1 / sigma_h^2 of the uniform split (the same mu-GDP guarantee)
    assert sum(s ** -2 for s in imp) == pytest.approx(sum(s ** -2 for s in heads["uniform"]), rel=1e-9)
    assert len(imp) == len(w)


def test_quick_language_model(quick_results):
    out, runs = quick_results
    r = runs["language_model"]
    results = json.loads(r.json_path.read_text())
    _provenance(results)
    assert set(results["cells"]) == {"non_private/eps=inf/seed=0", "clip_only/eps=inf/seed=0",
                                     "dpfa/eps=8/seed=0", "textbook/eps=8/seed=0"}
    for key, c in results["cells"].items():
        ppl = c["test_perplexity"]
        assert 1.0 < ppl < 77.0, (key, ppl)  # better than uniform over the 70-odd characters
        spent = c["train"]["epsilon_spent"]
        assert spent == "inf" if c["method"] in ("non_private", "clip_only") else 0 < spent <= 8.0 + 1e-9
    tb = results["cells"]["textbook/eps=8/seed=0"]
    match = tb["wall_clock_match"]
    assert tb["train"]["steps"] == match["textbook_steps"] == max(1, round(
        match["dpfa_steps"] * match["dpfa_seconds_per_step"] / match["textbook_seconds_per_step"]))
    rows = {(row["method"], row["epsilon"]) for row in results["summary"]["rows"]}
    assert ("dpfa", "8") in rows and ("textbook", "8") in rows
    md = r.markdown_path.read_text()
    assert "inf (no clipping)" in md and "dpfa run experiments/configs/language_model.toml --quick" in md


def test_resume_computes_only_new_cells(quick_results, tmp_path):
    out, runs = quick_results
    for name in ("accountants_quick.json", "language_model_quick.json"):
        shutil.copy(out / name, tmp_path / name)
    again = run_config(CONFIGS / "accountants.toml", quick=True, out_dir=tmp_path, progress=False)
    assert again.computed == () and len(again.cached) == 7
    more = run_config(CONFIGS / "language_model.toml", quick=True, seeds=2, out_dir=tmp_path, progress=False)
    assert sorted(more.cached) == sorted(runs["language_model"].computed)
    assert all(k.endswith("seed=1") for k in more.computed) and len(more.computed) == 4
    assert more.results["seeds"] == [0, 1] and len(more.results["runs"]) == 2


def test_speed_refuses_on_cpu(tmp_path, capsys):
    with pytest.raises(DPFAError, match="needs a CUDA"):
        run_config(CONFIGS / "speed.toml", device="cpu", out_dir=tmp_path, progress=False)
    assert main(["run", str(CONFIGS / "speed.toml"), "--device", "cpu", "--out-dir", str(tmp_path)]) == 2
    assert "needs a CUDA" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_speed_quick_on_cpu_times_the_training_step_only(tmp_path):
    """--quick runs every config on a CPU: for speed that is the training-step table (the
    attention tables time Triton kernels and need a GPU)."""
    run = run_config(CONFIGS / "speed.toml", quick=True, device="cpu", out_dir=tmp_path, progress=False)
    assert list(run.results["cells"]) == ["train_step"]
    t = run.results["cells"]["train_step"]["result"]["seconds_per_step"]
    assert all(t[k] > 0 for k in ("non_private", "dpfa", "textbook"))


def test_bad_configs(tmp_path):
    bad = tmp_path / "language_model.toml"
    bad.write_text("seeds = [0]\n[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        run_config(bad, out_dir=tmp_path, progress=False)
    bad.write_text("epsilons = [8, 0]\n")
    with pytest.raises(ConfigError, match="epsilon"):
        run_config(bad, out_dir=tmp_path, progress=False)
    other = tmp_path / "mystery.toml"
    other.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="unknown experiment 'mystery'"):
        run_config(other, out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="--seeds"):
        run_config(CONFIGS / "language_model.toml", seeds=0, out_dir=tmp_path, progress=False)


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--quick" in text and "--device" in text and "--seeds" in text and "resumes" in text


def test_figs_from_results(quick_results, tmp_path):
    from dpfa.experiments.figs import build_figures

    out, _ = quick_results
    results = tmp_path / "results"
    shutil.copytree(out, results)
    for name in ("flash_attention.json", "audit.json"):
        shutil.copy(ROOT / "experiments" / "results" / name, results / name)
    notes = []
    paths = build_figures(results, tmp_path / "figs", log=notes.append)
    names = {p.name for p in paths}
    assert {f"{n}.{e}" for n in ("privacy_utility", "speed", "epsilon_vs_steps", "audit_roc", "noise_per_head")
            for e in ("png", "pdf")} == names
    assert any("using the reduced run" in n for n in notes)
    assert all(p.stat().st_size > 1000 for p in paths)
    with pytest.raises(DPFAError, match="Unknown figure"):
        build_figures(results, tmp_path / "figs", only=["nope"])


def test_data_loaders_and_clear_errors(monkeypatch):
    from dpfa.data import load_digits_images, load_wikipedia_splits

    train, test = load_digits_images()
    assert len(train) + len(test) == 1797 and train[0][0].shape == (1, 8, 8)
    assert 0.0 <= float(train.tensors[0].min()) and float(train.tensors[0].max()) <= 1.0
    counts = torch.bincount(test.tensors[1], minlength=10)
    assert int(counts.min()) >= 35  # stratified: every class ~20% of its ~180 images
    tr, va, te, vocab = load_wikipedia_splits(block_size=32, max_chars=50_000)
    assert len(tr) > 7 * len(te) and len(va) == len(te)
    monkeypatch.setitem(sys.modules, "gensim.test.utils", None)
    with pytest.raises(DPFAError, match="gensim"):
        load_wikipedia_splits(32)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DPFAError, match="scikit-learn"):
        load_digits_images()


def test_vit_under_the_engine_is_exact():
    """One DP-SGD step of the ViT (Conv2d patches, Embedding positions, nn.MultiheadAttention) with no noise
    equals the textbook clipped mean of vmap per-example gradients."""
    from dpfa.models import ViT, ViTConfig
    from dpfa.training import PrivacyEngine

    torch.manual_seed(0)
    cfg = ViTConfig(n_layer=1, n_embd=16, n_head=2)
    model, ref = ViT(cfg), ViT(cfg)
    ref.load_state_dict(model.state_dict())
    x, y = torch.rand(6, 1, 8, 8), torch.randint(10, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6)
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        model, opt, _ = PrivacyEngine(accountant="rdp", seed=0).make_private(
            model, opt, loader, noise_multiplier=0.0, target_delta=1e-5, max_grad_norm=0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    want = clipped_mean(per_example_grads(ref, F.cross_entropy, x, y), 0.3, 6)
    for name in ("patch.weight", "pos.weight", "blocks.0.fc.weight", "blocks.0.attn.out_proj.weight", "head.bias"):
        got = before[name] - dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(got, want[name].to(got.dtype), rtol=1e-4, atol=1e-6)


def test_textbook_step_is_the_clipped_mean():
    from dpfa.experiments.dpsgd import TrainSpec, _TextbookStep
    from dpfa.models import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    model, ref = GPT(cfg), GPT(cfg)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randint(11, (5, 8)), torch.randint(11, (5, 8))

    def loss_fn(logits, t):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _TextbookStep(model, loss_fn, TrainSpec(batch_size=4, max_grad_norm=0.5), "cpu", 0)(
        opt, [0, 1, 2, 3, 4], torch.utils.data.TensorDataset(x, y), 0.0)
    want = clipped_mean(per_example_grads(ref, loss_fn, x, y), 0.5, 4)  # divided by the expected batch size
    for name, p in model.named_parameters():
        torch.testing.assert_close(before[name] - p.detach(), want[name].to(p.dtype), rtol=1e-4, atol=1e-7)


def test_train_step_times_runs_anywhere():
    from dpfa.experiments.speed import TrainStepSpec, train_step_times

    r = train_step_times(TrainStepSpec(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, batch_size=4,
                                       warmup=1, repeats=2), "cpu")
    assert set(r["seconds_per_step"]) == {"non_private", "dpfa", "textbook"}
    assert all(v > 0 for v in r["seconds_per_step"].values())
    assert r["ratio_to_non_private"]["non_private"] == 1.0 and math.isfinite(r["dpfa_speedup_over_textbook"])
