"""Hierarchical VAEs: the bound, the factorization of the posterior, exact gradients, equal sizes,
the binarized tasks, the Trainer and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import haet
from haet.cli import main
from haet.data import get_task
from haet.data.loader import BernoulliData, Loader
from haet.generative import generative_eval, iw_nll
from haet.generative.models import KINDS, SRVAE, VaeParams, count_parameters, gaussian_kl, gaussian_log_prob
from haet.methods import parse_entry
from haet.models import build_model

SHAPE = (1, 8, 8)


def tiny(kind: str, layers: int = 3, latents: int = 3, hidden: int = 16, seed: int = 0, shape=SHAPE):
    torch.manual_seed(seed)
    return KINDS[kind](shape, VaeParams(layers, latents, hidden))


def binary_images(n: int = 32, seed: int = 0, shape=SHAPE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *shape), 0.3), generator=g)


def noise(model, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, model.latents, generator=g) for _ in range(model.num_layers)]


# -- the bound ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_elbo_is_below_the_importance_weighted_bound_and_equals_it_for_one_sample(kind):
    model = tiny(kind)
    x = binary_images()
    k = 16
    log_w = model.log_weights(x, k, generator=torch.Generator().manual_seed(1))  # (k, N), the same samples
    elbo = log_w.mean(0)
    iw = torch.logsumexp(log_w, 0) - math.log(k)
    assert (elbo <= iw + 1e-5).all()
    assert (iw - elbo).mean() > 0.01  # strictly tighter on these samples: the bound is not the ELBO again
    # K = 1: the importance-weighted estimate is the one-sample ELBO of the same draw.
    one = model.log_weights(x, 1, generator=torch.Generator().manual_seed(2))[0]
    assert torch.allclose(-iw_nll(model, x, 1, torch.Generator().manual_seed(2)), one, atol=1e-5)
    # The evaluation's nll with K = 1 is the negative one-sample ELBO, never below the negative ELBO's mean by
    # more than noise; with K = 64 it is lower (tighter).
    data = haet.TensorData(x, torch.zeros(len(x), dtype=torch.long))
    m1 = generative_eval(model, data, torch.device("cpu"), iw_samples=1)
    m64 = generative_eval(model, data, torch.device("cpu"), iw_samples=64)
    assert m64["nll"] < m1["nll"]
    assert m64["nll"] < m64["neg_elbo"]


@pytest.mark.parametrize("kind", ["srvae", "ladder-vae"])
def test_closed_form_kl_is_the_expectation_of_the_sampled_log_ratio(kind):
    """The training loss uses the closed-form KL; averaged over many draws, the sampled importance
    weights give the same ELBO (within 4 standard errors)."""
    model = tiny(kind)
    x = binary_images(8)
    with torch.no_grad():
        log_w = model.log_weights(x, 4000, generator=torch.Generator().manual_seed(3))  # (k, N)
        mc, se = log_w.mean(0), log_w.std(0) / math.sqrt(log_w.shape[0])
        torch.manual_seed(4)
        analytic = torch.stack([-model(x) for _ in range(400)]).mean(0)  # its likelihood term is sampled too
    assert ((analytic - mc).abs() <= 4 * se + 0.05).all(), (analytic - mc, se)


def test_gaussian_kl_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(3, generator=g), torch.randn(3, generator=g)
    s_q, s_p = torch.rand(3, generator=g) + 0.5, torch.rand(3, generator=g) + 0.5
    z = mu_q + s_q * torch.randn(200_000, 3, generator=g)
    mc = (gaussian_log_prob(z, mu_q, s_q) - gaussian_log_prob(z, mu_p, s_p)).mean()
    assert abs(float(gaussian_kl(mu_q, s_q, mu_p, s_p)) - float(mc)) < 0.02


# -- the factorization of the posterior ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["srvae", "ladder-vae"])
def test_posterior_layer_depends_on_x_and_earlier_latents_only(kind):
    """q's layer l reads x and z_<l: changing the noise of later layers leaves it unchanged; changing an
    earlier layer's noise, or x, changes it."""
    model = tiny(kind, layers=4)
    x = binary_images(6)
    base = model.layers(x, noise=noise(model, len(x), 0))
    for l in range(model.num_layers):
        later = noise(model, len(x), 0)
        for j in range(l + 1, model.num_layers):
            later[j] = later[j] + 3.0
        moved = model.layers(x, noise=later)
        for a, b in zip(base[l][:4], moved[l][:4]):  # mu_q, sigma_q, eps, z of layer l
            assert torch.equal(a, b), f"layer {l} changed when only later layers' noise changed"
        if l > 0:
            earlier = noise(model, len(x), 0)
            earlier[l - 1] = earlier[l - 1] + 3.0
            assert not torch.allclose(model.layers(x, noise=earlier)[l].mu_q, base[l].mu_q)
        assert not torch.allclose(model.layers(1 - x, noise=noise(model, len(x), 0))[l].mu_q, base[l].mu_q)


def test_bottom_up_posterior_of_hvae_does_not_factorize_like_its_generative_model():
    """The contrast: hvae's q for generative layer l reads the latent below it (sampled before it)."""
    model = tiny("hvae", layers=4)
    x = binary_images(6)
    base = model.layers(x, noise=noise(model, len(x), 0))
    moved_noise = noise(model, len(x), 0)
    moved_noise[3] = moved_noise[3] + 3.0
    assert not torch.allclose(model.layers(x, noise=moved_noise)[0].mu_q, base[0].mu_q)


def test_srvae_posterior_and_prior_share_the_bijector():
    """z_l is the generative bijector of layer l applied to the posterior's eps_l, and the bijector's
    matrix diag(d) + u u^T stays positive definite (invertible) even for large latents."""
    model = tiny("srvae", layers=3)
    x = binary_images(5)
    terms = model.layers(x, noise=noise(model, len(x), 1))
    z_prev = model.z0.expand(len(x), -1)
    for l, t in enumerate(terms):
        assert torch.allclose(model.bijection(l, z_prev, t.eps), t.z)
        z_prev = t.z
    eye = torch.eye(model.latents)
    big = 1e3 * torch.randn(50, model.latents)
    jac = torch.stack([torch.autograd.functional.jacobian(lambda e: model.bijection(0, big[i:i + 1], e),
                                                          torch.zeros(1, model.latents))[0, :, 0, :]
                       for i in range(len(big))])
    eig = torch.linalg.eigvalsh((jac + jac.transpose(1, 2)) / 2)
    assert (eig > 0).all() and (eig < 3.01).all()
    assert jac.shape[1:] == eye.shape


# -- gradients ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,options", [(k, {}) for k in KINDS] + [("srvae", {"reflect": False})])
def test_elbo_gradients_match_finite_differences(kind, options):
    torch.manual_seed(0)
    model = KINDS[kind]((1, 2, 3), VaeParams(2, 2, 3, **options)).double()
    x = binary_images(4, shape=(1, 2, 3)).double()
    fixed = [n.double() for n in noise(model, len(x), 5)]
    names = [f"vae.{n}" for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    class NegElbo(torch.nn.Module):  # the ELBO of fixed noise, as a function of the parameters
        def __init__(self):
            super().__init__()
            self.vae = model

        def forward(self):
            t = self.vae.layers(x, noise=fixed)
            return -(self.vae.log_likelihood(x, t) - sum(self.vae.layer_kl(t))).sum()

    wrapper = NegElbo()

    def neg_elbo(*values):
        return torch.func.functional_call(wrapper, dict(zip(names, values)), ())

    assert torch.autograd.gradcheck(neg_elbo, params, eps=1e-6, atol=1e-5)


# -- equal sizes --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,layers,latents", [((1, 28, 28), 10, 10), ((1, 8, 8), 4, 4), ((1, 28, 28), 3, 20)])
def test_baselines_get_the_parameter_count_of_srvae(shape, layers, latents):
    target = count_parameters("srvae", shape, VaeParams(layers, latents))
    for kind in ("ladder-vae", "hvae"):
        model = build_model(f"{kind}:layers={layers},latents={latents}", shape, 10)
        assert abs(model.num_parameters() - target) / target < 0.01, (kind, model.num_parameters(), target)
    explicit = build_model("hvae:layers=2,latents=2,hidden=8", shape, 10)
    assert explicit.hidden == 8


# -- the binarized tasks ------------------------------------------------------------------------
def test_binarized_task_draws_fresh_binary_images_each_epoch_reproducibly():
    task = get_task("digits-bin")
    train, test = task.load(0, None)
    assert isinstance(train, BernoulliData)
    assert set(test.x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(test.x, task.load(0, None)[1].x)  # a fixed binarization of the test images
    first = next(iter(Loader(train, 64, seed=3).set_epoch(1)))[0]
    again = next(iter(Loader(train, 64, seed=3).set_epoch(1)))[0]
    second = next(iter(Loader(train, 64, seed=3).set_epoch(2)))[0]
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first, again)  # a resumed run sees the same draws
    # Same data order as the grey images (the draws use their own stream), different draws per epoch.
    grey = next(iter(Loader(haet.TensorData(train.x, train.y), 64, seed=3).set_epoch(1)))[0]
    assert ((first == 1) <= (grey > 0)).all() and ((grey == 1) <= (first == 1)).all()
    order2 = next(iter(Loader(haet.TensorData(train.x, train.y), 64, seed=3).set_epoch(2)))[0]
    assert not torch.equal(second, (order2 > 0.5).float())
    # Per-pixel frequency over epochs approaches the grey level.
    draws = torch.stack([BernoulliData.draw(train.x[:8], torch.Generator().manual_seed(s)) for s in range(400)])
    assert (draws.mean(0) - train.x[:8]).abs().max() < 0.1


# -- the Trainer and the command line -----------------------------------------------------------
def test_training_lowers_the_test_nll_and_resumes_identically(tmp_path):
    task = get_task("digits-bin:iw=8")
    train, test = task.load(0, None)

    def trainer(out=None):
        haet.seed_everything(0)
        model = build_model("srvae:layers=3,latents=4,hidden=32", task.input_shape, 10)
        return haet.Trainer(model, train, test, loss_fn=task.loss_fn, eval_fn=task.eval_fn, progress=False,
                            device="cpu", out_dir=out, checkpoint=out is not None,
                            optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))

    straight = trainer()
    record = straight.fit(3)
    nll = [h["nll"] for h in record.history]
    assert nll[-1] < nll[0] - 1.0, nll
    assert record.metrics["iw_samples"] == 8 and record.cost["model_params"] > 0
    first = trainer(tmp_path / "r")
    first.fit(1)
    again = trainer(tmp_path / "r")
    resumed = again.fit(3, resume_from=tmp_path / "r")
    for (name, a), b in zip(straight.state.model.state_dict().items(), again.state.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.metrics["nll"] == record.metrics["nll"]
    assert resumed.history[-1]["train_loss"] == record.history[-1]["train_loss"]


def test_cli_trains_a_generative_model_saves_and_evaluates_it(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--task", "digits-bin:iw=4", "--model", "srvae:layers=2,latents=3,hidden=16",
                 "--epochs", "1", "--out", str(out), "--save-model", "--until", "nll=1"])
    assert code == 0
    record = json.loads((out / "record.json").read_text())
    assert record["model"] == "srvae:layers=2,latents=3,hidden=16"
    assert {"nll", "neg_elbo", "bits_per_dim", "kl", "recon", "active_units"} <= set(record["metrics"])
    assert record["metrics"]["bits_per_dim"] == pytest.approx(record["metrics"]["nll"] / (64 * math.log(2)))
    assert record["cost"]["target"] == "nll<=1.0" or record["cost"]["target"] == "nll<=1"
    printed = capsys.readouterr().out
    assert "test NLL" in printed and "bits/dim" in printed and "samples.png" in printed
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = haet.load_model(out)
    assert isinstance(model, SRVAE) and model.num_layers == 2
    assert main(["eval", str(out)]) == 0
    assert f"{record['metrics']['nll']:.4f}" in capsys.readouterr().out  # the same figure from the saved weights


@pytest.mark.parametrize("args,named", [
    (["--task", "digits-bin", "--model", "srvae:layers=0"], "layers"),
    (["--task", "digits-bin", "--model", "srvae:depth=3"], "depth"),
    (["--task", "digits-bin", "--model", "mlp"], "srvae"),
    (["--task", "digits", "--model", "srvae"], "srvae"),
    (["--task", "digits-bin:iw=0"], "iw"),
    (["--task", "digits-bin", "--model", "mlp:width=3"], "mlp"),
    (["--task", "digits-bin", "--model", "srvae:layers=65"], "layers"),
])
def test_bad_generative_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, named):
    out = tmp_path / "o"
    assert main(["train", *args, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0], err
    assert not out.exists()


def test_srvae_with_more_blocks_than_pixels_is_refused(tmp_path, capsys):
    assert main(["train", "--task", "digits-bin:iw=2", "--model", "srvae:layers=64,hidden=16", "--epochs", "1", "--quiet",
                 "--budget", "steps=1", "--out", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    spec_err = pytest.raises(haet.ConfigError, build_model, "srvae:layers=10", (1, 2, 3), 10)
    assert "layers=10" in str(spec_err.value) and "6" in str(spec_err.value)


@pytest.mark.parametrize("method", ["gradmatch", "label_smoothing", "eqprop", "downsample"])
def test_methods_that_need_a_classifier_refuse_generative_models_at_construction(method):
    task = get_task("digits-bin")
    train, test = task.load(0, None)
    model = build_model("srvae:layers=2,latents=2,hidden=8", task.input_shape, 10)
    with pytest.raises(haet.ConfigError, match=method):
        haet.Trainer(model, train, test, loss_fn=task.loss_fn, eval_fn=task.eval_fn, progress=False,
                     methods=parse_entry(method))


def test_sample_draws_images_of_the_input_shape():
    for kind in KINDS:
        model = tiny(kind)
        g = torch.Generator().manual_seed(0)
        probs = model.sample(5, g)
        binary = model.sample(5, g, binary=True)
        assert probs.shape == binary.shape == (5, *SHAPE)
        assert ((probs >= 0) & (probs <= 1)).all() and set(binary.unique().tolist()) <= {0.0, 1.0}


def _all_methods():
    from haet.methods import registry

    return sorted(registry())


#: Defaults made for classifiers that diverge on a VAE (the record says so: stopped_by "nonfinite_loss").
SETTINGS = {"sc_sgd": "sc_sgd:lr=0.005"}


@pytest.mark.parametrize("method", _all_methods())
def test_every_method_refuses_a_generative_model_at_construction_or_trains_it(method):
    """No method crashes on a VAE or silently trains on something else: either the Trainer refuses
    the pair when it is built, or a few steps give a finite loss and a finite test NLL."""
    task = get_task("digits-bin:iw=2")
    train, test = task.load(0, None)
    haet.seed_everything(0)
    model = build_model("srvae:layers=2,latents=2,hidden=64", task.input_shape, 10)  # 64x64 layers: tensor_train applies
    try:
        trainer = haet.Trainer(model, train, test, loss_fn=task.loss_fn, eval_fn=task.eval_fn, progress=False,
                               methods=parse_entry(SETTINGS.get(method, method)), budget=haet.Budget(steps=4),
                               device="cpu")
    except haet.ConfigError as err:
        assert method.split("_")[0] in str(err) or "generative" in str(err) or type(model).__name__ in str(err)
        return
    record = trainer.fit(1)
    assert record.stopped_by in ("budget:steps", "epochs"), record.error
    assert math.isfinite(record.metrics["nll"]) and math.isfinite(record.history[0]["train_loss"])


def test_kl_warmup_weights_the_kl_by_training_passes_and_never_changes_the_evaluation():
    torch.manual_seed(0)
    model = KINDS["ladder-vae"](SHAPE, VaeParams(2, 2, 8, warmup=4))
    x = binary_images(8)
    fixed = noise(model, len(x), 0)
    terms = model.layers(x, noise=fixed)
    rec, kl = model.log_likelihood(x, terms), sum(model.layer_kl(terms))
    assert (kl > 0).all()
    model.layers = lambda x, noise=None, generator=None, _t=terms: _t  # the same draw for every pass below
    model.train()
    betas = []
    for _ in range(6):
        out = model(x)
        betas.append(float(((-out - rec) / -kl).mean()))
    assert betas == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1], abs=1e-5)
    assert int(model.passes) == 4  # counted until the warm-up is over
    model.eval()
    assert torch.allclose(model(x), -(rec - kl))
    assert "passes" in model.state_dict()  # checkpoints and saved models keep the warm-up's progress


def test_bench_and_report_of_a_generative_task_show_the_nll_not_an_accuracy(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--task", "digits-bin:iw=2", "--model", "srvae:layers=2,latents=2,hidden=16",
                 "--methods", "baseline,ema", "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test NLL" in printed and "accuracy" not in printed
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| method"))
    assert "test NLL (nats)" in header and "accuracy" not in header
    assert "nats)" in next(line for line in report.splitlines() if line.startswith("| ema"))  # the difference in nats
    assert (out / "pareto.png").stat().st_size > 0


def test_bf16_training_keeps_densities_in_float32():
    task = get_task("digits-bin:iw=4")
    train, test = task.load(0, None)
    haet.seed_everything(0)
    model = build_model("srvae:layers=2,latents=3,hidden=32", task.input_shape, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model.layers(binary_images(4))
    assert all(t.mu_q.dtype == t.z.dtype == torch.float32 for t in terms)
    record = haet.Trainer(model, train, test, loss_fn=task.loss_fn, eval_fn=task.eval_fn, progress=False,
                          device="cpu", precision="bf16", budget=haet.Budget(steps=10)).fit(1)
    assert math.isfinite(record.metrics["nll"]) and "bfloat16" in record.cost["flops_by_dtype"]


def test_srvae_data_layer_reads_the_previous_block_unless_residual_is_off():
    x = binary_images(4)
    for residual, moves in ((True, True), (False, False)):
        torch.manual_seed(0)
        model = SRVAE(SHAPE, VaeParams(4, 3, 16, residual=residual))
        terms = model.layers(x, noise=noise(model, len(x), 0))
        flat = x.reshape(len(x), -1)
        blocks = flat.split(model.blocks, dim=-1)
        before = model.block_logits(2, terms[2].z, blocks[1])
        after = model.block_logits(2, terms[2].z, 1 - blocks[1])
        assert (not torch.allclose(before, after)) == moves
    with pytest.raises(haet.ConfigError, match="apply to srvae only"):
        build_model("hvae:residual=false", SHAPE, 10)


def test_bijector_inverse_and_log_determinant_are_exact():
    model = tiny("srvae", layers=2, latents=4)
    g = torch.Generator().manual_seed(0)
    z_prev, eps = 3 * torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    z = model.bijection(1, z_prev, eps)
    back, log_det = model.inverse(1, z_prev, z)
    assert torch.allclose(back, eps, atol=1e-5)
    for i in range(len(z)):
        jac = torch.autograd.functional.jacobian(lambda e: model.bijection(1, z_prev[i:i + 1], e), eps[i:i + 1])[0, :, 0, :]
        assert torch.allclose(log_det[i], torch.linalg.slogdet(jac)[1], atol=1e-5)


def test_srvae_without_reflection_keeps_the_factorization_with_a_posterior_on_z():
    """reflect=false: q is a Gaussian of z_l itself (no shared bijector), still conditioned on z_<l and x; the
    importance weights use the change of variables, so the IW bound still sits above the sampled ELBO and the
    sampled KL is the average gap between log q and log p."""
    torch.manual_seed(0)
    model = SRVAE(SHAPE, VaeParams(3, 3, 16, reflect=False))
    assert model.num_parameters() == tiny("srvae").num_parameters()
    x = binary_images(6)
    base = model.layers(x, noise=noise(model, len(x), 0))
    assert all(t.log_det is not None and torch.equal(t.z, t.mu_q + t.sigma_q * n)
               for t, n in zip(base, noise(model, len(x), 0)))
    later = noise(model, len(x), 0)
    later[2] = later[2] + 3
    assert torch.equal(model.layers(x, noise=later)[1].mu_q, base[1].mu_q)
    log_w = model.log_weights(x, 32, generator=torch.Generator().manual_seed(1))
    assert (log_w.mean(0) <= torch.logsumexp(log_w, 0) - math.log(32) + 1e-5).all()
    kl = sum(model.layer_kl(base))
    rec = model.log_likelihood(x, base)
    one = model.log_weights(x, 1, noise=noise(model, len(x), 0))[0]
    assert torch.allclose(rec - kl, one, atol=1e-4)  # the sampled ELBO of that draw


def test_eval_of_a_vae_on_another_task_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "vae"
    assert main(["train", "--task", "digits-bin:iw=2", "--model", "srvae:layers=2,latents=2,hidden=8", "--epochs", "1",
                 "--save-model", "--quiet", "--out", str(out)]) == 0
    capsys.readouterr()
    for task, named in (("mnist5k", "does not fit task mnist5k"), ("mnist5k-bin", "does not take mnist5k-bin's inputs")):
        assert main(["eval", str(out), "--task", task]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err
