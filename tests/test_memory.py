"""The memory model's arithmetic, term by term, against values computed by hand for a tiny decoder:
hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV heads (kv width 32), vocab 300, untied."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import TINY_ARCH

from finetrack.config import ConfigError, Environment, HeadConfig, load_config, resolve_model
from finetrack.fit import ranked_changes
from finetrack.memory import (
    CPU_HEAP_SLACK_PER_FORWARD_BYTE,
    CPU_QUANT_LEFTOVER_PER_WEIGHT_BYTE,
    CPU_RUN_OBJECTS_BYTES,
    CUDA_CONTEXT_BYTES,
    Architecture,
    Workload,
    breakdown,
    head_params,
    num_adapter_params,
    peak_bytes,
    peak_phase,
    trainable_params,
)

TINY = {**TINY_ARCH, "dtype": "float32"}
ARCH = Architecture.from_hf_config(TINY)
WORK = Workload(micro_batch_tokens=16, longest_row_tokens=8, target_tokens=6, num_rows=2, masked=False)  # 2 rows of 8, 6 carry loss


def config(*overrides: str, device: str = "cpu"):
    cfg = load_config(
        None,
        ["model.dtype=float32", "model.lora.r=4", *overrides]
        if "model.method=full" not in overrides
        else ["model.dtype=float32", *overrides],
    )
    return resolve_model(cfg, Environment(device, device == "cuda", 1, 100))[0]


def terms_of(cfg, work=WORK, device="cpu") -> dict[str, int]:
    return {t.name: t.bytes for t in breakdown(cfg, ARCH, work, device)}


def test_parameter_counts():
    # per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate 64x128 + up 64x128 + down 128x64
    assert ARCH.num_layer_linear_params == 4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192 == 36_864
    assert ARCH.num_embedding_params == ARCH.num_lm_head_params == 300 * 64
    assert ARCH.num_norm_params == (2 * 2 + 1) * 64
    assert ARCH.num_params == 2 * 36_864 + 2 * 19_200 + 320 == 112_448
    tied = Architecture.from_hf_config({**TINY, "tie_word_embeddings": True})
    assert tied.num_params == 112_448 - 19_200


def test_missing_keys_are_named():
    with pytest.raises(ValueError, match="hidden_size, num_hidden_layers"):
        Architecture.from_hf_config({"vocab_size": 10, "intermediate_size": 4, "num_attention_heads": 2})


def test_weights_by_dtype_and_4bit():
    assert terms_of(config("model.method=full"))["weights"] == 112_448 * 4
    bf16 = resolve_model(load_config(None, ["model.method=full", "model.dtype=bfloat16"]), Environment("cpu", False, 1, 100))[0]
    assert terms_of(bf16)["weights"] == 112_448 * 2
    # 73,728 linear weights: 0.5 B each + 1,152 blocks of 64 (uint8 absmax) + 5 float32 second-level absmax
    # + one shared 256-entry float32 map + 14 modules x 16-entry float32 code
    qlora = terms_of(config("model.method=qlora", "model.qlora.double_quant=true"), device="cuda")
    assert qlora["weights (4-bit)"] == 36_864 + 1_152 + 5 * 4 + 256 * 4 + 14 * 16 * 4 == 39_956
    assert qlora["weights (not quantized)"] == (112_448 - 73_728) * 4  # upcast to float32 by PEFT
    single = terms_of(config("model.method=qlora", "model.qlora.double_quant=false"), device="cuda")
    assert single["weights (4-bit)"] == 36_864 + 1_152 * 4 + 14 * 16 * 4
    assert qlora["dequantized weight (transient)"] == 64 * 128 * 4  # backward dequantizes gate/up/down one at a time
    lora = terms_of(config("model.method=lora"), device="cuda")
    assert qlora["weights (4-bit)"] + qlora["weights (not quantized)"] < lora["weights"]
    # on the CPU the float32 file stays mapped (the embedding is a view into it): its pages count in RSS, and
    # quantizing leaves heap holes
    on_cpu = terms_of(config("model.method=qlora"))
    assert on_cpu["checkpoint pages kept mapped"] == 73_728 * 4
    assert on_cpu["quantization leftovers (CPU heap)"] == int(CPU_QUANT_LEFTOVER_PER_WEIGHT_BYTE * 73_728 * 4)


def test_unresolved_config_is_refused():
    with pytest.raises(ValueError, match="resolve the config first"):
        breakdown(load_config(None, []), ARCH, WORK, "cpu")


def test_lora_parameters():
    # r x (in + out): q 4x128, k 4x96, v 4x96, o 4x128, gate 4x192, up 4x192, down 4x192 = 4,096 per layer
    assert num_adapter_params(config(), ARCH) == 2 * (512 + 384 + 384 + 512 + 768 + 768 + 768) == 8_192
    assert num_adapter_params(config("model.lora.layers_to_transform=[1]"), ARCH) == 4_096
    assert num_adapter_params(config("model.lora.target_modules=[q_proj,v_proj]"), ARCH) == 2 * (512 + 384)
    assert terms_of(config())["LoRA adapters"] == 8_192 * 4


def test_gradients_and_optimizer_state():
    lora = terms_of(config())
    assert lora["gradients"] == 8_192 * 4
    assert lora["optimizer state"] == 2 * 8_192 * 4
    assert lora["optimizer step buffers"] == 2 * (4 * 128) * 4  # CPU: sqrt(v) and sqrt(v)/c of lora_A of down_proj
    assert terms_of(config(), device="cuda")["optimizer step buffers"] == 8_192 * 4  # foreach: one buffer for all
    full = terms_of(config("model.method=full"))
    assert full["gradients"] == 112_448 * 4
    assert full["optimizer state"] == 2 * 112_448 * 4
    eight_bit = terms_of(config("model.method=full", "train.optimizer=adamw_8bit"))
    assert eight_bit["optimizer state"] == 2 * 112_448 + 2 * 4 * 112_448 // 256 == 228_410  # uint8 + float32 per 256
    paged = breakdown(config("train.optimizer=paged_adamw"), ARCH, WORK, "cuda")
    state = next(t for t in paged if t.name == "optimizer state")
    assert state.bytes == 8_192 * 8 and not state.measured and "spills to CPU" in state.detail


def test_full_bfloat16_gradients_state_and_logits():
    bf16 = resolve_model(load_config(None, ["model.method=full", "model.dtype=bfloat16"]), Environment("cpu", False, 1, 100))[0]
    terms = terms_of(bf16)
    assert terms["gradients"] == 112_448 * 2  # in the parameters' dtype
    assert terms["optimizer state"] == 2 * 112_448 * 2  # torch AdamW: exp_avg, exp_avg_sq like the parameters
    assert terms["optimizer step buffers"] == 2 * 19_200 * 2  # CPU: 2 x the largest tensor (the embedding)
    # 6 targets x 300 vocab x 2 B logits gradient + lm_head weight gradient 19,200 x 2 B > 6 x 300 x 12 B of float32 buffers
    assert terms["logits and loss"] == 6 * 300 * 2 + 19_200 * 2 == 42_000


def test_paged_adamw_8bit():
    for method, trainable in (("full", 112_448), ("lora", 8_192)):
        by = {t.name: t for t in breakdown(config(f"model.method={method}", "train.optimizer=paged_adamw_8bit"), ARCH, WORK, "cuda")}
        state = by["optimizer state"]
        # 2 uint8 states + one float32 absmax per 256 values; in CUDA unified memory, so not in max_memory_allocated
        assert state.bytes == 2 * trainable + 2 * 4 * trainable // 256 and not state.measured and "paged" in state.detail
        assert "optimizer step buffers" not in by  # bitsandbytes updates in place


def test_gradients_stay_alive_when_accumulating():
    single = {t.name: t for t in breakdown(config("model.method=full"), ARCH, WORK, "cuda")}
    accum = {t.name: t for t in breakdown(config("model.method=full", "train.grad_accum_steps=4"), ARCH, WORK, "cuda")}
    assert single["gradients"].phases == ("step",) and accum["gradients"].phases == ()


# Per token and layer, float32, sdpa, no mask (bytes): norms 2 x (4x64 + 4) = 520; q 4x64 + k 4x32 + v 4x32
# + output 4x64 + logsumexp 4x4 heads = 784; gate, up, silu 3 x 4x128 = 1,536; outside the layers: final
# norm (4x64 + 4) per token.
def test_activations_lora_float32():
    # + attention input 256 + mlp input 256 + down input 512 (lora_A needs them) + lora_A outputs 7 x 4x4
    per_token = 520 + 256 + 784 + 256 + 1_536 + 512 + 7 * 16
    assert per_token == 3_976
    assert terms_of(config())["activations"] == 2 * 16 * 3_976 + 16 * 260


def test_activations_with_a_mask():
    # padded or packed rows: k and v repeated to 4 heads (4 x (64+64+64+64) + 16 = 1,040 instead of 784), the
    # mask as float32 per layer (2 rows x 8^2 x 4 B = 4 x 8 B per token), and once as bool (2 x 8^2)
    per_token = 520 + 256 + 1_040 + 4 * 8 + 256 + 1_536 + 512 + 7 * 16
    masked = Workload(16, 8, 6, 2, masked=True)
    assert terms_of(config(), masked)["activations"] == 2 * 16 * per_token + 16 * 260 + 2 * 8 * 8


def test_activations_full_float32():
    # norms also keep their normalized input (+2 x 256); every linear input is needed for its weight gradient;
    # outside: final norm 260 + 256, input ids 8 B per token, lm_head input 6 targets x 256
    per_token = (520 + 512) + 256 + 784 + 256 + 1_536 + 512
    assert terms_of(config("model.method=full"))["activations"] == 2 * 16 * per_token + 16 * (260 + 256) + 16 * 8 + 6 * 256


def test_activations_lora_bfloat16_casts_inputs_to_float32():
    cfg = resolve_model(load_config(None, ["model.dtype=bfloat16", "model.lora.r=4"]), Environment("cpu", False, 1, 100))[0]
    # norms 520; q,k,v 3 float32 copies of the attention input 3 x 256; q, k, v, output 2 x (64+32+32+64) + 16;
    # o_proj's float32 copy 256; gate, up copies 2 x 256; gate, up, silu 3 x 2x128; down copy 4x128; lora_A 112
    per_token = 520 + 768 + (2 * 192 + 16) + 256 + 512 + 768 + 512 + 112
    assert terms_of(cfg)["activations"] == 2 * 16 * per_token + 16 * 260


def test_activations_lora_dropout_keeps_a_copy_and_a_mask_per_module():
    # each adapted module keeps its dropped-out input (4 B) and the mask (1 B) instead of the shared input
    per_token = 520 + 3 * 320 + 784 + 320 + 2 * 320 + 1_536 + 640 + 112
    assert terms_of(config("model.lora.dropout=0.1"))["activations"] == 2 * 16 * per_token + 16 * 260


def test_activations_qlora_are_float32_whatever_the_compute_dtype():
    # prepare_model_for_kbit_training upcasts norms, embeddings and lm_head: the residual stream and every
    # Linear4bit output are float32, so a bf16 QLoRA run saves what float32 LoRA saves (no float32 input copies)
    bf16 = resolve_model(
        load_config(None, ["model.method=qlora", "model.dtype=bfloat16", "model.lora.r=4"]), Environment("cuda", True, 1, 100)
    )[0]
    assert bf16.model.dtype == "bfloat16"
    assert terms_of(bf16, device="cuda")["activations"] == 2 * 16 * 3_976 + 16 * 260
    assert terms_of(bf16, device="cuda")["logits and loss"] == 6 * 300 * 12


def test_gradient_checkpointing_keeps_layer_inputs_and_one_layer():
    terms = terms_of(config("model.gradient_checkpointing=true"))
    assert terms["activations (checkpointed)"] == 2 * 16 * 4 * 64 + 16 * 260
    assert terms["activations (one layer recomputed)"] == 16 * (3_976 + 2 * 4 * (64 + 128))  # + gradients in flight
    plain = terms_of(config())["activations"]
    assert terms["activations (checkpointed)"] + terms["activations (one layer recomputed)"] < plain


def test_eager_attention_grows_quadratically_with_row_length():
    def activations(attn: str, row_tokens: int) -> int:
        work = Workload(2 * row_tokens, row_tokens, 6, 2, masked=True)
        return terms_of(config(f"model.attn_implementation={attn}"), work)["activations"]

    # f(S) = alpha S + beta S^2: f(2S) - 2 f(S) = 2 beta S^2. Eager: beta = 2 layers x 2 rows x 4 heads x 4 B
    # (float32 probabilities) + 2 rows x 4 B (its float mask) = 72. sdpa with a mask: 2 layers x 2 rows x 4 B
    # (float mask per layer) + 2 rows x 1 B (bool mask) = 18
    assert activations("eager", 16) - 2 * activations("eager", 8) == 2 * 72 * 8**2
    assert activations("eager", 32) - 2 * activations("eager", 16) == 2 * 72 * 16**2
    assert activations("sdpa", 16) - 2 * activations("sdpa", 8) == 2 * 18 * 8**2


def test_logits_and_loss():
    assert terms_of(config())["logits and loss"] == 6 * 300 * 12  # log-softmax output, its gradient, nll gradient
    # full: the logits' gradient (4 B) while lm_head's weight gradient (300 x 64 x 4 B) appears
    assert terms_of(config("model.method=full"))["logits and loss"] == 6 * 300 * 4 + 19_200 * 4


def test_overheads_and_peak():
    cpu = breakdown(config(), ARCH, WORK, "cpu")
    by = {t.name: t for t in cpu}
    assert not by["framework overhead"].measured and by["run objects"].bytes == CPU_RUN_OBJECTS_BYTES
    assert by["CPU heap slack"].bytes == int(CPU_HEAP_SLACK_PER_FORWARD_BYTE * by["activations"].bytes)
    cuda = breakdown(config(), ARCH, WORK, "cuda")
    assert {t.name: t.bytes for t in cuda}["framework overhead"] == CUDA_CONTEXT_BYTES
    loss = 112_448 * 4 + 8_192 * 4 + 2 * 8_192 * 4 + 131_392 + 21_600  # weights, adapters, state, activations, logits
    step = 112_448 * 4 + 8_192 * 4 + 2 * 8_192 * 4 + 8_192 * 4 + 8_192 * 4  # + gradients, foreach buffer
    assert peak_bytes(cuda, measured_only=True) == max(loss, step) == loss
    assert peak_bytes(cuda) == loss + CUDA_CONTEXT_BYTES
    assert peak_phase(cuda) == "loss"


def work_for(cfg) -> Workload:
    rows, width = cfg.train.micro_batch_size, min(512, cfg.data.max_length)
    return Workload(rows * width, width, rows * width // 2, rows, masked=True)


def test_ranked_changes_put_a_fitting_change_first():
    cfg = config("train.micro_batch_size=8", "data.max_length=512", device="cuda")
    base = peak_bytes(breakdown(cfg, ARCH, work_for(cfg), "cuda"))
    checkpointed = config("train.micro_batch_size=8", "data.max_length=512", "model.gradient_checkpointing=true", device="cuda")
    budget = (base + peak_bytes(breakdown(checkpointed, ARCH, work_for(checkpointed), "cuda"))) // 2
    changes = ranked_changes(cfg, ARCH, work_for, "cuda", budget)
    assert changes and changes[0].fits and changes[0].peak_bytes <= budget
    fits = [c.fits for c in changes]
    assert fits == sorted(fits, reverse=True)  # every fitting change before any that does not
    assert any(c.overrides == ["model.gradient_checkpointing=true"] for c in changes)
    for change in changes:  # the overrides are valid config text, and the config they give has the predicted peak
        changed = config("train.micro_batch_size=8", "data.max_length=512", *change.overrides, device="cuda")
        assert peak_bytes(breakdown(changed, ARCH, work_for(changed), "cuda")) == change.peak_bytes, change.overrides


def test_ranked_changes_combine_when_no_single_change_fits():
    cfg = config("model.method=full", "train.micro_batch_size=8", "data.max_length=512", device="cuda")
    singles = ranked_changes(cfg, ARCH, work_for, "cuda", 10**12)
    tight = min(c.peak_bytes for c in singles) - 1
    changes = ranked_changes(cfg, ARCH, work_for, "cuda", tight)
    combined = [c for c in changes if " + " in c.description]
    assert combined and combined[0].peak_bytes < tight + 1 and len(combined[0].overrides) >= 2


def test_ranked_changes_offer_all_six_kinds():
    cfg = config(
        "model.lora.target_modules=all-linear",
        "train.optimizer=adamw",
        "data.max_length=512",
        "train.micro_batch_size=4",
        "model.gradient_checkpointing=false",
        device="cuda",
    )
    base = peak_bytes(breakdown(cfg, ARCH, work_for(cfg), "cuda"))
    changes = ranked_changes(cfg, ARCH, work_for, "cuda", base - 1)
    keys = {tuple(sorted(o.split("=")[0] for o in c.overrides)) for c in changes}  # each fits alone: no combination
    assert keys == {
        ("model.gradient_checkpointing",),
        ("train.grad_accum_steps", "train.micro_batch_size"),
        ("data.max_length",),
        ("model.method",),
        ("model.lora.target_modules",),
        ("train.optimizer",),
    }
    overrides = {o for c in changes for o in c.overrides}
    assert {
        "model.gradient_checkpointing=true",
        "data.max_length=256",
        "model.method=qlora",
        "model.lora.target_modules=[q_proj,v_proj]",
        "train.optimizer=adamw_8bit",
        "train.micro_batch_size=2",
    } <= overrides
    assert all(c.peak_bytes < base for c in changes)


# ------------------------------------------------------------------------------------------ objectives
# objective.kind regression / contrastive: a float32 head, hidden-state reads, triplets, a frozen backbone
READS = Workload(micro_batch_tokens=16, longest_row_tokens=8, target_tokens=0, num_rows=2, masked=False, num_reads=2)


def test_regression_head_parameters_gradients_and_state():
    # Linear(64, 1): 65 params; Linear(64, 16) + Linear(16, 1): 1,040 + 17
    assert head_params(64, HeadConfig()) == 65 and head_params(64, HeadConfig(hidden_sizes=[16])) == 1_057
    plain, reg = config(), config("objective.kind=regression", "objective.regression.head.hidden_sizes=[16]")
    assert trainable_params(reg, ARCH).params == trainable_params(plain, ARCH).params + 1_057 == 8_192 + 1_057
    terms = terms_of(reg, READS)
    assert terms["regression head"] == (1_057 + 2) * 4  # float32, plus the target mean and std buffers
    assert terms["gradients"] == (8_192 + 1_057) * 4
    assert terms["optimizer state"] == 2 * (8_192 + 1_057) * 4  # AdamW: 2 float32 states for the adapters and the head
    # bf16 full fine-tuning: the model's states in bf16, the head's in float32
    bf16 = resolve_model(
        load_config(None, ["model.method=full", "model.dtype=bfloat16", "objective.kind=regression", "objective.regression.lm_weight=1"]),
        Environment("cpu", False, 1, 100),
    )[0]
    assert terms_of(bf16, READS)["optimizer state"] == 2 * (112_448 * 2 + 65 * 4)


def test_full_fine_tuning_without_a_next_token_term_leaves_an_untied_lm_head_untrained():
    # its logits never reach the loss: no gradient, no AdamW state (300 x 64 lm_head of the tiny model)
    assert trainable_params(config("model.method=full", "objective.kind=regression"), ARCH).params == 112_448 - 19_200 + 65
    assert trainable_params(
        config("model.method=full", "objective.kind=regression", "objective.regression.lm_weight=0.5"), ARCH
    ).params == (112_448 + 65)


def test_freeze_backbone_trains_the_head_only_and_keeps_no_activations():
    frozen = config("objective.kind=regression", "objective.regression.freeze_backbone=true")
    by = {t.name: t for t in breakdown(frozen, ARCH, READS, "cpu")}
    assert by["gradients"].bytes == 65 * 4 and by["optimizer state"].bytes == 2 * 65 * 4
    assert by["LoRA adapters"].bytes == 8_192 * 4  # still in memory, frozen
    # nothing saved for backward: one layer's tensors in flight (as a frozen base layer would save them: norms 520,
    # q, k, v, output 784, gate, up, silu 1,536) and the hidden-states tuple: 2 layer inputs + the final norm's output
    assert by["activations (frozen backbone: none kept)"].bytes == 16 * (520 + 784 + 1_536)
    assert by["hidden states (output_hidden_states)"].bytes == 3 * 16 * 4 * 64
    assert by["activations (frozen backbone: none kept)"].phases == ("forward",) and "CPU heap slack" not in by
    assert peak_phase(list(by.values())) == "forward"
    full = terms_of(config("model.method=full", "objective.kind=regression", "objective.regression.freeze_backbone=true"), READS)
    assert full["optimizer state"] == 2 * 65 * 4  # instead of 2 x 93,248 x 4 B for the model
    # gradient checkpointing would recompute a backbone that keeps nothing: a config error, and never a suggested fix
    with pytest.raises(ConfigError, match="set model.gradient_checkpointing=false"):
        config("objective.kind=regression", "objective.regression.freeze_backbone=true", "model.gradient_checkpointing=true")


def test_hidden_states_and_reads_count_at_the_end_of_the_forward():
    terms = {t.name: t for t in breakdown(config("objective.kind=regression"), ARCH, READS, "cuda")}
    # float32: autograd keeps the layer inputs anyway; the final norm's output is extra until the forward returns
    assert terms["hidden states (output_hidden_states)"].bytes == 16 * 4 * 64 and terms["hidden states (output_hidden_states)"].phases == (
        "forward",
    )
    assert terms["activations"].bytes == 2 * 16 * 3_976 + 16 * 260 and terms["activations"].phases == ("forward", "loss")
    # no next-token term: logits at one position per row during the forward, no logits at the start of backward
    assert terms["logits (end of forward)"].bytes == 2 * 300 * 4 and "logits and loss" not in terms
    assert terms["pooling matrices"].bytes == 2 * 16 * 4 and terms["pooling matrices"].phases == ()
    # pooled states and the head's input (2 x 64 x 4 B), the read state's dense gradient (16 x 64 x 4 B)
    assert terms["hidden-state reads"].bytes == 2 * 4 * 64 + 16 * 64 * 4
    assert peak_phase(list(terms.values())) == "forward"
    # bfloat16: the layer inputs autograd does not keep (it keeps float32 copies) are held too
    bf16 = resolve_model(load_config(None, ["model.dtype=bfloat16", "objective.kind=regression"]), Environment("cpu", False, 1, 100))[0]
    assert terms_of(bf16, READS)["hidden states (output_hidden_states)"] == 3 * 16 * 2 * 64
    on = resolve_model(
        load_config(None, ["model.dtype=bfloat16", "objective.kind=regression", "model.gradient_checkpointing=true"]),
        Environment("cpu", False, 1, 100),
    )[0]
    assert terms_of(on, READS)["hidden states (output_hidden_states)"] == 16 * 2 * 64  # checkpointing keeps the layer inputs


def test_contrastive_logits_only_with_a_task_loss():
    triplets = Workload(micro_batch_tokens=48, longest_row_tokens=8, target_tokens=6, num_rows=6, masked=False, num_reads=6)
    terms = terms_of(config("objective.kind=contrastive"), triplets)
    assert terms["logits and loss"] == 6 * 300 * 12 and terms["logits (end of forward)"] == 6 * 300 * 4
    assert terms["activations"] == 2 * 48 * 3_976 + 48 * 260  # all 3 x 2 sequences
    no_task = terms_of(
        config("objective.kind=contrastive", "objective.contrastive.lambda_task=0"), dataclasses.replace(triplets, target_tokens=0)
    )
    assert "logits and loss" not in no_task and no_task["logits (end of forward)"] == 6 * 300 * 4  # logits_to_keep=1 per row
