"""DP-SGD at a site: epsilon accounted across rounds with Opacus's accountant, budget enforced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant

from egcmf_model.config import VARIANTS, PrivacyConfig, load_config
from egcmf_model.data.source import open_sites
from egcmf_model.data.synthetic import write_synthetic
from egcmf_model.engine import build_model, compile_fusion, forward, pick_device, train_epoch
from egcmf_model.losses import EGCMFLoss
from egcmf_model.trainer import make_loader
from fl_client.privacy import (
    BudgetExhausted,
    PrivacyLedger,
    average_views,
    dp_generators,
    make_private,
    noise_only_step,
)
from fl_client.train import local_train, training_loss, training_speed
from sim.run import main as sim_main

DP = ["model.variant=unet", "model.norm=group", "dp.enabled=true", "dp.noise_multiplier=1.0",
      "dp.max_grad_norm=1.0", "train.epochs=1", "train.lr=0.003"]


def _setup(synth_root: Path, *extra: str):
    cfg = load_config("tiny", overrides=[*DP, *extra])
    source = open_sites(synth_root / "site_01")
    torch.manual_seed(0)
    return cfg, source, build_model(cfg.model, source.classes)


def test_epsilon_grows_and_matches_opacus(synth_root: Path, tmp_path: Path) -> None:
    cfg, source, model = _setup(synth_root)
    ledger = PrivacyLedger(tmp_path / "privacy.json")
    eps = []
    for rnd in (1, 2):
        metrics = local_train(model, source.split("train"), source.classes, cfg,
                              pick_device("cpu"), seed=rnd, ledger=ledger, site="a")
        eps.append(metrics["epsilon"])
        assert metrics["noise_multiplier"] == 1.0  # the configured one, which it trained with
    assert 0 < eps[0] < eps[1]
    reloaded = PrivacyLedger(tmp_path / "privacy.json")  # the next process reads it back
    assert sum(steps for _, _, steps in reloaded.history) == 2  # one batch a round, 2 rounds
    accountant = RDPAccountant()  # Opacus's own accountant, fed the same steps
    for _ in range(2):
        accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    assert accountant.get_epsilon(cfg.dp.delta) == pytest.approx(eps[1])


def test_training_stops_at_the_budget(synth_root: Path, tmp_path: Path) -> None:
    cfg, source, model = _setup(synth_root)
    ledger = PrivacyLedger(tmp_path / "privacy.json")
    first = local_train(model, source.split("train"), source.classes, cfg, pick_device("cpu"),
                        seed=1, ledger=ledger, site="a")["epsilon"]
    capped, _, _ = _setup(synth_root, f"dp.epsilon={first * 1.2}")
    with pytest.raises(BudgetExhausted, match="privacy budget spent"):
        local_train(model, source.split("train"), source.classes, capped, pick_device("cpu"),
                    seed=2, ledger=ledger, site="a")
    assert len(PrivacyLedger(tmp_path / "privacy.json").history) == 1  # nothing was spent


def test_a_budget_no_noise_can_reach_is_refused_with_what_to_change(
        synth_root: Path, tmp_path: Path) -> None:
    """epsilon 0.1 over 20 planned rounds: no noise multiplier reaches it. The site refuses
    to train, saying why and what to change, and spends nothing; epsilon <= 0 is refused
    before anything starts."""
    from egcmf_model.config import ConfigError

    cfg, source, model = _setup(synth_root, "dp.epsilon=0.1", "dp.noise_multiplier=0",
                                "dp.planned_rounds=20")
    ledger = PrivacyLedger(tmp_path / "privacy.json")
    with pytest.raises(BudgetExhausted, match=r"site a: a privacy budget of epsilon 0\.1 "
                       r"\(delta 1e-05\) is too small for 20 rounds .* raise --epsilon"):
        local_train(model, source.split("train"), source.classes, cfg, pick_device("cpu"),
                    seed=1, ledger=ledger, site="a")
    assert not ledger.path.exists()
    for budget in ("dp.epsilon=0", "dp.epsilon=-1", "dp.delta=0", "dp.delta=1"):
        with pytest.raises(ConfigError, match="the privacy budget needs epsilon > 0"):
            load_config("tiny", overrides=[budget])


def test_batchnorm_network_is_refused(synth_root: Path, tmp_path: Path) -> None:
    cfg, source, model = _setup(synth_root, "model.norm=batch")
    with pytest.raises(ValueError, match=r"model\.norm=group"):
        local_train(model, source.split("train"), source.classes, cfg, pick_device("cpu"),
                    seed=1, ledger=PrivacyLedger(tmp_path / "p.json"), site="a")


def test_dp_federation_still_learns(tmp_path: Path) -> None:
    """Epsilon 8 over 3 rounds: the global model's Dice beats the initial model's (round 0)."""
    data = tmp_path / "synth"
    write_synthetic(data, sites=2, rois_per_site=24, size=256, seed=7)
    out = tmp_path / "dp"
    assert sim_main(["--clients", "2", "--rounds", "3", "--variant", "unet", "--dp",
                     "--epsilon", "8", "--data", str(data), "--dataset", "synthetic",
                     "--local-epochs", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["dice"] > summary["initial"]["dice"] + 0.05
    assert all(0 < eps <= 8 for eps in summary["epsilon"].values())
    assert set(summary["initial"]["sites"]) == set(summary["epsilon"])


def test_an_empty_poisson_batch_is_a_noise_only_step(synth_root: Path, tmp_path: Path) -> None:
    """Poisson sampling can draw no tile at all; DP-SGD still takes its noisy step, counted."""
    cfg, source, model = _setup(synth_root)
    loader = make_loader(source.split("train"), source.classes, cfg, train=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    private, optimizer, loader, engine = make_private(
        model, optimizer, loader, cfg.dp, PrivacyLedger(tmp_path / "p.json"), 1, "a",
        torch.Generator())
    assert loader.collate_fn([]) is None
    before = [p.detach().clone() for p in private.parameters()]
    stats = train_epoch(private, [None], optimizer, pick_device("cpu"),
                        EGCMFLoss(cfg.loss.gamma), on_empty=noise_only_step(optimizer))
    assert stats["num-examples"] == 0
    assert all(not torch.equal(b, p) for b, p in zip(before, private.parameters(), strict=True))
    assert engine.accountant.history == [(1.0, 1 / len(loader), 1)]


def test_dp_simulation_reports_epsilon_per_site_reproducibly(synth_root: Path,
                                                             tmp_path: Path) -> None:
    args = ["--clients", "2", "--rounds", "2", "--variant", "unet", "--dp", "--epsilon", "50",
            "--data", str(synth_root), "--dataset", "synthetic", "--local-epochs", "1"]
    out, again = tmp_path / "dp", tmp_path / "dp-again"
    assert sim_main([*args, "--out", str(out)]) == 0
    assert sim_main([*args, "--out", str(again)]) == 0  # sampling and noise follow the seed
    assert (out / "metrics.jsonl").read_text() == (again / "metrics.jsonl").read_text()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for site in lines[0]["sites"]:
        assert 0 < lines[0]["sites"][site]["epsilon"] < lines[1]["sites"][site]["epsilon"] <= 50
        ledger = json.loads((out / "site_state" / site / "privacy.json").read_text())["history"]
        noise = {sigma for sigma, _, _ in ledger}  # the noise multiplier the site trained with
        assert noise == {line["sites"][site]["noise_multiplier"] for line in lines}
        assert min(noise) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["epsilon"]) == set(lines[0]["sites"])
    assert "| training examples | ε | σ |" in (out / "summary.md").read_text()
    assert "norm: group" in (out / "config.yaml").read_text()


def test_the_report_shows_each_dp_sites_latest_epsilon_and_noise(tmp_path: Path) -> None:
    """A site that did not train in the last round (its budget spent) keeps, in summary.md,
    the epsilon and the noise multiplier of its latest training, side by side."""
    from sim.report import write_reports

    metrics = {"dice": 0.5, "miou": 0.4, "acc": 0.9, "loss": 0.3}
    trained = {"a": {**metrics, "num-examples": 4, "epsilon": 4.7, "noise_multiplier": 1.1},
               "b": {**metrics, "num-examples": 3, "epsilon": 4.7, "noise_multiplier": 1.3}}
    refused = {"a": {**metrics, "num-examples": 4, "epsilon": 7.1, "noise_multiplier": 1.1},
               "b": dict(metrics)}  # b only evaluated in round 2
    lines = [{"round": 1, **metrics, "sites": trained}, {"round": 2, **metrics, "sites": refused}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = {"epsilon": {"a": 7.1, "b": 4.7}, "best": {"round": 2, "dice": 0.5}}
    write_reports(tmp_path, summary, "federated")
    table = (tmp_path / "summary.md").read_text()
    assert "| a | 0.5000 | 0.4000 | 0.9000 | 4 | 7.1000 | 1.1000 |" in table
    assert "| b | 0.5000 | 0.4000 | 0.9000 |  | 4.7000 | 1.3000 |" in table


def test_server_side_dp_accounts_and_stops_at_its_budget(synth_root: Path,
                                                          tmp_path: Path) -> None:
    """Flower's DifferentialPrivacyServerSideFixedClipping with its RDP accountant."""
    common = ["--clients", "2", "--variant", "unet", "--data", str(synth_root), "--dataset",
              "synthetic", "--local-epochs", "1", "--server-dp-noise", "1.0",
              "--server-dp-clip", "5.0"]
    out = tmp_path / "sdp"
    assert sim_main([*common, "--rounds", "2", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 < lines[0]["server_epsilon"] < lines[1]["server_epsilon"]
    budget = (lines[0]["server_epsilon"] + lines[1]["server_epsilon"]) / 2
    capped = tmp_path / "capped"
    assert sim_main([*common, "--rounds", "3", "--server-dp-epsilon", str(budget),
                     "--out", str(capped)]) == 0
    assert len((capped / "metrics.jsonl").read_text().splitlines()) == 1  # stopped in time
    assert "privacy" in (capped / "events.jsonl").read_text()
    summary = json.loads((capped / "summary.json").read_text())
    assert summary["stopped"] == "the server-side DP budget was spent before round 2"
    assert sim_main(["--resume", "--out", str(capped)]) == 2  # it ended: nothing to resume


def test_server_side_dp_epsilon_continues_after_a_resume(synth_root: Path,
                                                        tmp_path: Path) -> None:
    """The accountant's history is in every checkpoint: a run resumed with more rounds goes
    on from the epsilon it had spent (a fresh accountant would restart at 0), the resume and
    the new number of rounds are recorded as events."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    from fl_server.strategy import ACCOUNTANT, StrategyOptions, make_strategy

    out = tmp_path / "sdp"
    assert sim_main(["--clients", "2", "--variant", "unet", "--data", str(synth_root),
                     "--dataset", "synthetic", "--local-epochs", "1", "--rounds", "2",
                     "--server-dp-noise", "1.0", "--server-dp-clip", "5.0",
                     "--out", str(out)]) == 0
    state = torch.load(out / "round_002.pt", weights_only=True)["strategy_state"]
    assert sum(c["count"] for c in json.loads(state[ACCOUNTANT])["compositions"]) == 2
    before = (out / "metrics.jsonl").read_text()
    assert sim_main(["--resume", "--rounds", "3", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "metrics.jsonl").read_text().startswith(before)
    expected = make_strategy(StrategyOptions(min_sites=2, sites=2, server_dp_noise=1.0,
                                             server_dp_clip=5.0)).accountant
    expected.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=2,
                                          population_size=2), count=3)
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert lines[2]["server_epsilon"] == pytest.approx(expected.get_privacy_spent().epsilon)
    assert lines[2]["server_epsilon"] > lines[1]["server_epsilon"] > lines[0]["server_epsilon"]
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events] == ["resume", "rounds"]
    assert (events[1]["previous"], events[1]["rounds"]) == (2, 3)


def _per_sample_grads(model: GradSampleModule, batch: dict, loss_fn: EGCMFLoss
                      ) -> list[torch.Tensor]:
    """Opacus's per-sample gradient of the first sample, for every trainable parameter."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad_sample = None
    loss_fn(forward(model, batch), batch)[0].backward()
    return [p.grad_sample[0].clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_samples_gradient_depends_on_another(variant: str, synth_root: Path) -> None:
    """Under Opacus, with the real network and the loss DP-SGD trains with: replacing sample j
    of a batch leaves sample i's per-sample gradient as it was. The loss pooled over the batch
    (Dice sums, CE's normaliser) fails the same check."""
    cfg = load_config("tiny", overrides=[f"model.variant={variant}", "model.norm=group",
                                         "dp.enabled=true", "data.augment=false"])
    source = open_sites(synth_root / "site_01")
    tiles = make_loader(source.records, source.classes, cfg, train=False).dataset
    items = [tiles[i] for i in range(3)]

    def pair(i: int, j: int) -> dict:
        return {k: torch.stack([items[i][k], items[j][k]]) for k in items[0] if k != "roi"}

    torch.manual_seed(0)
    model = GradSampleModule(build_model(cfg.model, source.classes))
    loss_fn = training_loss(cfg)
    assert loss_fn.per_sample
    first, second = (_per_sample_grads(model, pair(0, j), loss_fn) for j in (1, 2))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    pooled = EGCMFLoss(cfg.loss.gamma, per_sample=False)
    first, second = (_per_sample_grads(model, pair(0, j), pooled) for j in (1, 2))
    assert max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True)) > 1e-4


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_samples_gradient_under_opacus_is_its_own_gradient(variant: str,
                                                                 synth_root: Path) -> None:
    """What DP-SGD clips is each tile's true gradient: Opacus's per-sample gradient of every
    trainable weight, in a batch of three, equals the gradient of that tile's loss alone, for
    every variant (MSFFM's attention and Grad-CAM included)."""
    cfg = load_config("tiny", overrides=[f"model.variant={variant}", "model.norm=group",
                                         "dp.enabled=true", "data.augment=false"])
    source = open_sites(synth_root / "site_01")
    tiles = make_loader(source.records, source.classes, cfg, train=False).dataset
    items = [tiles[i] for i in range(3)]

    def batch_of(*idx: int) -> dict:
        return {k: torch.stack([items[i][k] for i in idx]) for k in items[0] if k != "roi"}

    torch.manual_seed(0)
    model = build_model(cfg.model, source.classes)
    loss_fn = training_loss(cfg)
    alone = []
    for i in range(3):
        model.zero_grad(set_to_none=True)
        loss_fn(forward(model, batch_of(i)), batch_of(i))[0].backward()
        alone.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    model.zero_grad(set_to_none=True)
    wrapped = GradSampleModule(model)  # the batch loss is the mean: grad_sample = each's own
    loss_fn(forward(wrapped, batch_of(0, 1, 2)), batch_of(0, 1, 2))[0].backward()
    # float32 noise is relative to the largest gradient (a bias before a norm that removes it
    # has a gradient of float noise alone)
    scale = max(float(g.abs().max()) for a in alone for g in a.values())
    for name, p in model.named_parameters():
        if name not in alone[0]:
            continue
        for i in range(3):
            err = float((p.grad_sample[i] - alone[i][name]).abs().max()) / scale
            assert err < 1e-3, (variant, name, i, err)


def test_dp_sgd_trains_in_float32_and_the_memory_layout_opacus_needs(synth_root: Path,
                                                                     tmp_path: Path) -> None:
    """Under DP-SGD a site trains without the GPU speed options. Opacus reads a convolution's
    input as standard (NCHW) memory to form its per-sample gradients: from channels-last
    memory they come out wrong (the test above fails on a channels-last network and batch).
    Under bf16 autocast it clips per-sample gradients held in bf16, and one sample's clipped
    gradient measured 1.0037 times the clipping norm: more than the accounting assumes."""
    fast = ["train.channels_last=true", "train.amp=bf16", "train.compile=true"]
    plain = training_speed(load_config("tiny", overrides=fast))
    private = training_speed(load_config("tiny", overrides=[*fast, "model.norm=group",
                                                            "dp.enabled=true"]))
    assert (plain.channels_last, plain.amp, plain.compile) == (True, "bf16", True)
    assert (private.channels_last, private.amp, private.compile) == (False, "none", False)
    # a network that an evaluation with the speed options left channels-last and compiled (a
    # site evaluates the model it receives, then trains on it) goes back to standard memory
    # and to layers called as themselves, which Opacus's hooks need, to train
    cfg = load_config("tiny", overrides=["model.norm=group"])
    model = build_model(cfg.model, ("background", "tumour")).to(memory_format=torch.channels_last)
    compile_fusion(model, True)
    assert not all(p.is_contiguous() for p in model.parameters())
    assert sum(m._compiled_call_impl is not None for m in model.modules()) == 8
    private.place(model, torch.device("cpu"))
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(m._compiled_call_impl is None for m in model.modules())
    dp, source, model = _setup(synth_root)
    model.to(memory_format=torch.channels_last)
    local_train(model, source.split("train"), source.classes, dp, pick_device("cpu"), seed=1,
                ledger=PrivacyLedger(tmp_path / "privacy.json"), site="a")
    assert all(p.is_contiguous() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_each_tiles_gradient_is_the_mean_over_its_own_orientations(synth_root: Path) -> None:
    """``dp.augmentations=4``: a tile comes as four distinct orientations, side by side in
    the batch, and the gradient DP-SGD clips for it is the mean of its four views'
    per-sample gradients, each computed with the tile alone, so no other tile enters it."""
    views = 4
    cfg = load_config("tiny", overrides=["model.variant=unet", "model.norm=group",
                                         "dp.enabled=true", f"dp.augmentations={views}"])
    source = open_sites(synth_root / "site_01")
    loader = make_loader(source.records, source.classes, cfg, train=True, views=views)
    tiles = [loader.dataset[i] for i in range(2)]
    assert tiles[0]["he"].shape[0] == views
    assert len({v.numpy().tobytes() for v in tiles[0]["he"]}) == views  # all distinct
    batch = loader.collate_fn(tiles)
    assert batch["he"].shape[0] == 2 * views
    assert batch["roi"] == [tiles[0]["roi"]] * views + [tiles[1]["roi"]] * views
    torch.manual_seed(0)
    model = GradSampleModule(build_model(cfg.model, source.classes))
    loss_fn = training_loss(cfg)
    inputs = {k: v for k, v in batch.items() if k != "roi"}
    model.zero_grad(set_to_none=True)
    loss_fn(forward(model, inputs), inputs)[0].backward()
    params = [p for p in model.parameters() if p.requires_grad]
    average_views(SimpleNamespace(params=params), views)()
    assert all(p.grad_sample.shape[0] == 2 for p in params)
    folded = [p.grad_sample[0].clone() for p in params]
    alone = [_per_sample_grads(model, {k: v[i : i + 1] for k, v in inputs.items()}, loss_fn)
             for i in range(views)]
    for got, *each in zip(folded, *alone, strict=True):
        torch.testing.assert_close(got, torch.stack(each).mean(0), rtol=1e-4, atol=1e-7)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_one_tile_moves_the_clipped_sum_by_at_most_the_clipping_norm_over_its_orientations(
        synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DP-SGD's sensitivity through ``local_train`` with ``dp.augmentations=4``: removing one
    tile changes the sum of clipped gradients (what the noise hides) by at most the clipping
    norm, as with one view; clipping each view alone would let a tile count four times."""
    from opacus.optimizers import DPOptimizer

    sums: list[torch.Tensor] = []
    add_noise = DPOptimizer.add_noise

    def capture(self: DPOptimizer) -> None:
        sums.append(torch.cat([p.summed_grad.flatten() for p in self.params]).clone())
        add_noise(self)

    monkeypatch.setattr(DPOptimizer, "add_noise", capture)
    cfg, source, _ = _setup(synth_root, "dp.augmentations=4")
    records = source.split("train")
    assert len(records) >= 2
    for tiles in (records, records[:-1]):
        torch.manual_seed(0)
        model = build_model(cfg.model, source.classes)
        local_train(model, tiles, source.classes, cfg, pick_device("cpu"), seed=1,
                    ledger=PrivacyLedger(tmp_path / f"{len(tiles)}.json"), site="a",
                    dp_seeded=True)
    assert len(sums) == 2
    assert float((sums[0] - sums[1]).norm()) <= cfg.dp.max_grad_norm * (1 + 1e-5)


def test_orientations_cost_no_privacy(synth_root: Path, tmp_path: Path) -> None:
    """Averaging over orientations spends what one view spends: the same noise, sample rate
    and steps in the ledger, the same epsilon; only the step differs."""
    start = None
    runs = {}
    for views in (1, 4):
        cfg, source, model = _setup(synth_root, f"dp.augmentations={views}")
        start = start or {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(start)
        ledger = PrivacyLedger(tmp_path / f"{views}.json")
        metrics = local_train(model, source.split("train"), source.classes, cfg,
                              pick_device("cpu"), seed=1, ledger=ledger, site="a",
                              dp_seeded=True)
        runs[views] = (ledger.history, metrics["epsilon"], model.state_dict())
    assert runs[1][:2] == runs[4][:2]
    assert any(not torch.equal(v, runs[4][2][k]) for k, v in runs[1][2].items())


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_dp_sgd_steps_along_the_noisy_gradient_where_adam_steps_by_its_sign(
        synth_root: Path, tmp_path: Path) -> None:
    """One DP step from the same weights with the same seeded noise: Adam's first step (every
    round starts one) moves each weight by lr, whatever its gradient; ``dp.optimizer=sgd``
    moves it in the same direction by lr times its noisy gradient."""
    lr, start, moved = 1e-3, None, {}
    for kind in ("adam", "sgd"):
        cfg, source, model = _setup(synth_root, f"dp.optimizer={kind}", f"dp.lr={lr}")
        start = start or {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(start)
        local_train(model, source.split("train"), source.classes, cfg, pick_device("cpu"),
                    seed=1, ledger=PrivacyLedger(tmp_path / f"{kind}.json"), site="a",
                    dp_seeded=True)
        moved[kind] = torch.cat([(p.detach() - start[n]).flatten()
                                 for n, p in model.named_parameters()])
    adam, sgd = moved["adam"], moved["sgd"]
    assert torch.allclose(adam.abs(), torch.full_like(adam, lr), rtol=1e-2)
    assert torch.equal(adam.sign(), sgd.sign())
    steps = sgd.abs() / lr  # the noisy gradient's magnitude, weight by weight
    assert float(steps.max() / steps.min()) > 10


def test_only_a_simulation_can_replay_dp_noise_and_sampling() -> None:
    """Deployment (no seed): sampling and noise draw from the OS's entropy, differently each
    time; simulation: both follow the seed. The two streams are separate generators."""
    cpu = pick_device("cpu")

    def draws(seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        sampling, noise = dp_generators(seed, cpu)
        return torch.rand(8, generator=sampling), torch.randn(8, generator=noise)

    for a, b in zip(draws(None), draws(None), strict=True):
        assert not torch.equal(a, b)
    for a, b in zip(draws(7), draws(7), strict=True):
        assert torch.equal(a, b)
    sampling = draws(7)[0]
    assert not torch.equal(sampling, torch.rand(8, generator=dp_generators(8, cpu)[0]))
    assert not torch.equal(sampling, torch.rand(8, generator=dp_generators(7, cpu)[1]))


def test_fedprox_pulls_towards_the_global_model_under_dp(synth_root: Path,
                                                         tmp_path: Path) -> None:
    """The proximal term is added after DP-SGD's noise: with the same seeded noise, a large
    mu keeps the weights closer to the global model than mu = 0 does."""
    cfg, source, model = _setup(synth_root, "train.epochs=4", "dp.epsilon=100")
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def distance(mu: float) -> float:
        model.load_state_dict(start)
        local_train(model, source.split("train"), source.classes, cfg, pick_device("cpu"),
                    seed=3, proximal_mu=mu, ledger=PrivacyLedger(tmp_path / f"{mu}.json"),
                    site="a", dp_seeded=True)
        return sum(float((v - start[k]).pow(2).sum()) for k, v in model.state_dict().items()
                   if v.is_floating_point()) ** 0.5

    free, again = distance(0.0), distance(0.0)
    assert free == again  # seeded: the same noise, so only mu differs below
    assert distance(1000.0) < 0.5 * free


def test_server_side_dp_noise_is_replayable_only_in_simulation() -> None:
    """Flower's server-side DP draws its noise from numpy's global generator, which the
    centre seeds for the initial model. A deployment reseeds it from the OS's entropy."""
    import numpy as np
    from flwr.serverapp.strategy import dp_fixed_clipping

    from fl_server.federation import seed_server

    cfg = load_config("tiny")

    def noise(simulation: bool) -> np.ndarray:
        seed_server(cfg, simulation)
        arrays = [np.zeros(16, np.float32)]
        dp_fixed_clipping.add_gaussian_noise_inplace(arrays, 1.0)  # what the strategy calls
        return arrays[0]

    assert not np.array_equal(noise(False), noise(False))
    assert np.array_equal(noise(True), noise(True))


def test_dp_sgd_leaves_frozen_encoders_as_they_came(synth_root: Path, tmp_path: Path) -> None:
    """``dp.frozen=encoders``: DP-SGD's noisy steps move every weight but the encoders', and
    leave the plain network behind; the next training without DP trains everything again."""
    from egcmf_model.engine import encoders

    public = tmp_path / "public.pt"  # encoders to start from (here: a random network's)
    torch.save(build_model(load_config("tiny", overrides=["model.norm=group"]).model,
                           open_sites(synth_root / "site_01").classes).state_dict(), public)
    cfg, source, model = _setup(synth_root, "model.variant=full", "dp.frozen=encoders",
                                f"model.weights={public}")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fixed = {f"{name}.{key}" for name, m in encoders(model).items()
             for key in m.state_dict()}
    assert len(encoders(model)) == 4
    assert fixed
    local_train(model, source.split("train"), source.classes, cfg, pick_device("cpu"), seed=1,
                ledger=PrivacyLedger(tmp_path / "p.json"), site="a", dp_seeded=True)
    for key, value in model.state_dict().items():
        if key in fixed:
            assert torch.equal(value, before[key]), key
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert moved
    assert not set(moved) & fixed
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    plain = load_config("tiny", overrides=["model.variant=full", "model.norm=group",
                                           "train.epochs=1"])
    local_train(model, source.split("train"), source.classes, plain, pick_device("cpu"), seed=2)
    assert all(p.requires_grad for p in model.parameters())
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in fixed)


def test_dp_on_the_built_in_set_takes_its_recipe_unless_told(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--dp on the built-in synthetic set (tiny preset), on the main job's own data: one local
    epoch per round, SGD at 0.2, each tile's gradient averaged over its 8 orientations;
    --config, --set and --local-epochs each still choose for themselves, and other data, other
    presets and runs without DP keep the preset's. --dp without a federation (--compare,
    --mode centralized) is refused before anything is written."""
    from sim.driver import configured
    from sim.run import build_parser

    def recipe(*argv: str) -> tuple[int, int, str, float, int]:
        cfg = configured(build_parser().parse_args(list(argv)))
        return (cfg.data.synth_rois_per_site, cfg.train.epochs, cfg.dp.optimizer,
                cfg.dp.step_size(), cfg.dp.augmentations)

    preset, dp = load_config("tiny"), PrivacyConfig()
    own = (preset.data.synth_rois_per_site, preset.train.epochs, dp.optimizer, dp.step_size(),
           dp.augmentations)
    assert own == (12, 7, "adam", 1e-2, 1)
    assert recipe() == own
    assert recipe("--dp") == (12, 1, "sgd", 0.2, 8)
    assert recipe("--dp", "--set", "dp.lr=0.05", "--set", "dp.augmentations=2") == (
        12, 1, "sgd", 0.05, 2)
    # back to Adam: at Adam's own step, not SGD's
    assert recipe("--dp", "--set", "dp.optimizer=adam", "--local-epochs", "4") == (
        12, 4, "adam", 1e-2, 8)
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  epochs: 2\ndp:\n  optimizer: adam\n  lr: 0.03\n")
    assert recipe("--dp", "--config", str(mine)) == (12, 2, "adam", 0.03, 8)
    assert recipe("--dp", "--data", str(tmp_path)) == own
    paper = load_config("paper")
    assert recipe("--dp", "--preset", "paper") == (paper.data.synth_rois_per_site,
                                                   paper.train.epochs, *own[2:])
    for other in (["--dp", "--compare"], ["--dp", "--mode", "centralized"],
                  ["--set", "dp.enabled=true", "--set", "model.norm=group", "--compare"]):
        assert sim_main([*other, "--out", str(tmp_path / "refused")]) == 2
        assert "--dp trains at the sites of a federation" in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()


def test_a_run_folders_config_finds_or_rebuilds_its_public_network(tmp_path: Path) -> None:
    """``config.yaml`` of a DP run on the built-in set names the public network by its path in
    the cache of the machine that ran it. Rerun with ``--config`` elsewhere, or after the cache
    was cleared (or under another PyTorch, which names it differently), that name leads to
    this machine's copy (trained again when missing); a weights file of the user's own is left
    as given."""
    from sim.public import public_config, public_folder, with_public_encoders

    cfg = load_config("tiny", overrides=["model.norm=group", "dp.enabled=true"])
    here = public_folder(public_config(cfg)) / "best.pt"
    assert with_public_encoders(cfg, train=False).model.weights == str(here)
    recorded = tmp_path / "other-machine" / "cache" / "public_0123456789ab" / "best.pt"
    rerun = load_config("tiny", overrides=["model.norm=group", "dp.enabled=true",
                                           f"model.weights={recorded}",
                                           "dp.frozen=encoders"])
    assert public_folder(public_config(rerun)) / "best.pt" == here
    found = with_public_encoders(rerun, train=False)
    assert (found.model.weights, found.dp.frozen) == (str(here), "encoders")
    mine = tmp_path / "public_mine" / "best.pt"  # the user's own file, by chance so named
    mine.parent.mkdir()
    mine.write_bytes(b"weights")
    for own in (mine, tmp_path / "missing.pt"):
        given = load_config("tiny", overrides=["model.norm=group", "dp.enabled=true",
                                               f"model.weights={own}"])
        assert with_public_encoders(given, train=False).model.weights == str(own)


def test_a_dp_simulation_on_the_built_in_set_starts_from_public_encoders(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """DP-SGD on the built-in synthetic set: the encoders come from a network trained without
    DP on another seed's synthetic set (no site's tile), trained once and then read from the
    cache, and stay as they came, server-side DP noise or not; the run's numbers do not depend
    on whether it was cached."""
    from egcmf_model.data.source import cache_dir

    # server-side DP noise on top: the centre keeps the frozen encoders out of its reach
    args = ["--clients", "2", "--rounds", "1", "--variant", "unet", "--dp", "--epsilon", "50",
            "--local-epochs", "1", "--set", "dp.public_epochs=1", "--server-dp-noise", "0.1",
            "--set", "data.synth_sites=2", "--set", "data.synth_rois_per_site=3"]
    out, again = tmp_path / "dp", tmp_path / "dp-again"
    with caplog.at_level("INFO", logger="sim"):
        assert sim_main([*args, "--out", str(out)]) == 0
    assert "training the public network once" in caplog.text
    assert ("DP-SGD at every site: epsilon 50, delta 1e-05 over 1 planned rounds; 1 local "
            "epoch(s), sgd at 0.2, batch 32, 8 orientation(s) of each tile") in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="sim"):
        assert sim_main([*args, "--out", str(again)]) == 0
    assert "training the public network" not in caplog.text
    assert (out / "metrics.jsonl").read_text() == (again / "metrics.jsonl").read_text()

    config = yaml.safe_load((out / "config.yaml").read_text())
    public = Path(config["model"]["weights"])
    assert public.parent.parent == cache_dir()
    assert config["dp"]["frozen"] == "encoders"
    public_state = torch.load(public, weights_only=True)
    assert public_state["config"]["data"]["synth_seed"] == config["data"]["synth_seed"] + 777
    final = torch.load(out / "final.pt", weights_only=True)["model"]
    encoder = [k for k in final if k.startswith("he_branch.target.encoder.")]
    assert encoder
    assert all(torch.equal(final[k], public_state["model"][k]) for k in encoder)
    assert any(not torch.equal(final[k], public_state["model"][k]) for k in final
               if not k.startswith("he_branch.target.encoder."))

    # a run resumed before its first checkpoint starts from the same public encoders, and
    # stating the preset again is no change
    early = tmp_path / "early"
    early.mkdir()
    for name in ("config.yaml", "settings.json", "partitions.json"):
        shutil.copy(out / name, early / name)
    assert sim_main([*args, "--preset", "tiny", "--resume", "--out", str(early)]) == 0
    assert (early / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()

    def tiles(seed: int) -> set[bytes]:
        root, = cache_dir().glob(f"synthetic_*_2x3_*px_seed{seed}")  # this test's sets
        return {p.read_bytes() for p in root.rglob("he.png")}  # (a mask may be all stroma)
    sites, public_tiles = tiles(config["data"]["synth_seed"]), tiles(
        config["data"]["synth_seed"] + 777)
    assert sites
    assert public_tiles
    assert not sites & public_tiles
