"""Batching: epoch order, micro-batch layout, and packed == one-by-one numerics on a real tiny Llama."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import build_tiny_model, chat_rows, tiny_run

from finetrack.batches import IGNORE, collate, epoch_order, packing_is_exact, step_rows
from finetrack.data import Example, tokenize_chat


def _examples(tokenizer, n: int) -> list[Example]:
    out = []
    for i, row in enumerate(chat_rows(n, seed=1)):
        ids, labels = tokenize_chat(row["messages"], tokenizer, "assistant")
        out.append(Example(ids, labels, "mem", i + 1))
    return out


def test_epoch_order_deterministic_and_complete():
    a = epoch_order(50, seed=7, epoch=0, shuffle=True)
    assert a == epoch_order(50, seed=7, epoch=0, shuffle=True)
    assert sorted(a) == list(range(50))
    assert a != epoch_order(50, seed=7, epoch=1, shuffle=True)
    assert epoch_order(5, 7, 0, shuffle=False) == [0, 1, 2, 3, 4]


def test_steps_cover_each_row_once_per_epoch():
    num_rows, per_step = 53, 8  # 6 full steps per epoch, 5 rows left out of each epoch
    for epoch in range(2):
        seen = []
        for k in range(6):
            e, rows = step_rows(num_rows, per_step, seed=1, step=epoch * 6 + k, shuffle=True)
            assert e == epoch and len(rows) == per_step
            seen += rows
        assert len(set(seen)) == 48


@pytest.mark.parametrize("row_tokens", [None, 400])
def test_collate_packed_layout(tiny_tokenizer, row_tokens):
    exs = _examples(tiny_tokenizer, 16)
    lengths = [len(e.input_ids) for e in exs]
    b = collate(exs, tiny_tokenizer.pad_token_id, pack=True, pack_row_tokens=row_tokens)
    ids, pos = b.inputs["input_ids"], b.inputs["position_ids"]
    assert "attention_mask" not in b.inputs and ids.shape == pos.shape == b.targets.shape
    assert b.num_tokens == sum(lengths)
    assert b.num_target_tokens == sum(e.num_trainable_tokens for e in exs)
    # rows no wider than the row budget (or 4x the longest sample when it is chosen automatically); little padding
    assert ids.shape[1] <= (row_tokens or 4 * max(lengths))
    assert ids.numel() <= 1.15 * sum(lengths), (ids.shape, sum(lengths))
    padded = collate(exs, tiny_tokenizer.pad_token_id, pack=False, pack_row_tokens=None).inputs["input_ids"]
    assert ids.numel() < padded.numel()
    # every sample starts at position 0; a target never crosses into the next sample
    starts = (pos == 0).sum().item()
    assert starts >= len(exs)
    for r in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if pos[r, t + 1] == 0:
                assert b.targets[r, t] == IGNORE


def _per_token_losses(model, batch) -> list[tuple[tuple[int, ...], list[float]]]:
    """(sample input ids, per-target losses) for each sample in a batch, found by splitting rows at position resets."""
    logits = model(**batch.inputs, use_cache=False).logits.float()
    losses = F.cross_entropy(logits.transpose(1, 2), batch.targets, reduction="none", ignore_index=IGNORE)
    ids = batch.inputs["input_ids"]
    pos = batch.inputs.get("position_ids")
    mask = batch.inputs.get("attention_mask")
    out = []
    for r in range(ids.shape[0]):
        if pos is None:
            n = int(mask[r].sum())
            bounds = [(0, n)]
        else:
            cuts = [t for t in range(ids.shape[1]) if pos[r, t] == 0] + [ids.shape[1]]
            bounds = list(zip(cuts[:-1], cuts[1:]))
        for s, e in bounds:
            tgt = batch.targets[r, s:e]
            if (tgt != IGNORE).any():
                out.append((tuple(ids[r, s:e].tolist()), losses[r, s:e][tgt != IGNORE].tolist()))
    return sorted(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_one_by_one(tiny_tokenizer, attn):
    model = build_tiny_model(tiny_tokenizer, seed=3)
    model.config._attn_implementation = attn
    model.eval()
    exs = _examples(tiny_tokenizer, 8)
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        packed = _per_token_losses(model, collate(exs, pad, pack=True, pack_row_tokens=300))
        padded = _per_token_losses(model, collate(exs, pad, pack=False, pack_row_tokens=300))
        alone = sorted(sum((_per_token_losses(model, collate([e], pad, pack=False, pack_row_tokens=300)) for e in exs), []))
    assert len(packed) == len(alone) == 8
    for (ids_p, lp), (ids_a, la), (_, lu) in zip(packed, alone, padded):
        assert ids_p == ids_a
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(la), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(lu), torch.tensor(la), atol=1e-4, rtol=1e-4)


class IgnoresPositions(torch.nn.Module):
    """A real model behind a wrapper that drops position_ids: it attends across the whole flattened row (what packing
    must never do). Everything else (config, save_pretrained, ...) is the inner model's."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, position_ids=None, **kw):
        return self.inner(input_ids=input_ids, **kw)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def test_packing_check_detects_a_model_that_mixes_sequences(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer, seed=0)
    assert packing_is_exact(model, torch.device("cpu"), len(tiny_tokenizer))
    assert not packing_is_exact(IgnoresPositions(model), torch.device("cpu"), len(tiny_tokenizer))


def test_pack_auto_falls_back_to_padded_batches_where_packing_is_not_exact(tmp_path, tiny_model_dir, chat_file, monkeypatch, caplog):
    """`data.pack: auto` on a model whose attention mixes packed sequences: padded batches, a logged reason, the same
    reason in config.resolved.yaml. An explicit `data.pack: true` on that model stays an error."""
    from finetrack import objectives, train
    from finetrack.config import ConfigError

    build = train.build_model
    monkeypatch.setattr(train, "build_model", lambda cfg, device: IgnoresPositions(build(cfg, device)))
    layouts = []

    def objective(model, batch):
        layouts.append(sorted(batch.inputs))
        return objectives.causal_lm(model, batch)

    with caplog.at_level("WARNING", logger="finetrack"):
        result, metrics = tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=full", "train.max_steps=2", objective=objective)
    assert len(metrics) == 2 and all(m["loss"] == m["loss"] for m in metrics)
    assert layouts and all(keys == ["attention_mask", "input_ids"] for keys in layouts)  # padded, never packed
    resolved = yaml.safe_load((result.run_dir / "config.resolved.yaml").read_text())
    reason = resolved["resolved"]["data.pack"]
    assert resolved["data"]["pack"] is False and reason["value"] is False
    assert reason["reason"].startswith("auto: this model's attention (sdpa) does not keep packed sequences apart")
    assert any(r.levelname == "WARNING" and reason["reason"] in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=r"data.pack: this model's attention \(sdpa\) does not keep packed sequences apart"):
        tiny_run(tmp_path, tiny_model_dir, chat_file, "model.method=full", "data.pack=true", name="explicit")
