"""The corrector forward against the stock FLUX forward and an independent joint-sequence reference."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from reflectionflow.models.corrector import (
    build_condition_cache,
    condition_ids,
    corrector_forward,
    dead_end_lora_parameters,
    latent_ids,
    pack_latents,
    unpack_latents,
)
from reflectionflow.models.lora import ADAPTER_NAME, add_lora
from reflectionflow.models.tiny import tiny_flux_components


@pytest.fixture(scope="module")
def components():
    return tiny_flux_components(seed=0)


def _fresh_transformer(components, lora=True, rank=4, alpha=8, target_modules="paper"):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_config(components["transformer"].config)
    tr.load_state_dict(components["transformer"].state_dict())
    if lora:
        torch.manual_seed(0)  # peft draws lora_A from the global generator
        add_lora(tr, rank=rank, alpha=alpha, target_modules=target_modules)
        gen = torch.Generator().manual_seed(1)
        for name, p in tr.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapter do something
                p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return tr.eval()


def _inputs(batch=2, n_text=7, latent=8, cond_size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_cond = (cond_size // 16) ** 2
    return dict(
        hidden_states=torch.randn(batch, (latent // 2) ** 2, 64, generator=g),
        encoder_hidden_states=torch.randn(batch, n_text, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=latent_ids(latent, latent),
        txt_ids=torch.zeros(n_text, 3),
        guidance=torch.full((batch,), 3.5),
    ), dict(cond_hidden_states=torch.randn(batch, n_cond, 64, generator=g), cond_ids=condition_ids(cond_size))


# ---------------------------------------------------------------------------------------------------------
# An independent reference: one concatenated [text | target | condition] sequence per block, modulation
# per segment, LoRA computed by hand from the peft weights, a boolean mask for causal mode.


def _linear(layer, x, lora: bool):
    if not hasattr(layer, "base_layer"):
        return layer(x)
    out = layer.base_layer(x)
    if lora:
        out = out + layer.lora_B[ADAPTER_NAME](layer.lora_A[ADAPTER_NAME](x)) * layer.scaling[ADAPTER_NAME]
    return out


def _adaln(norm, emb, lora):
    return _linear(norm.linear, F.silu(emb), lora)


def reference_forward(tr, inputs, cond, attention, lora_on_target):
    t_lora = lora_on_target  # whether LoRA applies on text/target image-stream layers
    hs, ehs, pooled = inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["pooled_projections"]
    b = hs.shape[0]
    x = _linear(tr.x_embedder, hs, t_lora)
    c = _linear(tr.x_embedder, cond["cond_hidden_states"], True)
    temb = tr.time_text_embed(inputs["timestep"] * 1000, inputs["guidance"] * 1000, pooled)
    ctemb = tr.time_text_embed(torch.zeros(b), torch.full((b,), 1000.0), pooled)
    txt = _linear(tr.context_embedder, ehs, True)
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"], cond["cond_ids"]])
    rope = tr.pos_embed(ids)
    n_t, n_x, n_c = txt.shape[1], x.shape[1], c.shape[1]
    n = n_t + n_x + n_c
    mask = torch.ones(n, n, dtype=torch.bool)
    if attention == "causal":
        mask[n_t + n_x :, : n_t + n_x] = False

    def attend(attn, q, k, v):
        q = apply_rotary_emb(q, rope, sequence_dim=1).transpose(1, 2)
        k = apply_rotary_emb(k, rope, sequence_dim=1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2).flatten(2)

    def heads(attn, t):
        return t.unflatten(-1, (-1, attn.head_dim))

    for blk in tr.transformer_blocks:
        attn = blk.attn
        segs = [(x, temb, t_lora), (c, ctemb, True)]
        mods, qs, ks, vs = [], [], [], []
        for h, e, lora in segs:
            m = _adaln(blk.norm1, e, lora).chunk(6, dim=1)
            nh = blk.norm1.norm(h) * (1 + m[1][:, None]) + m[0][:, None]
            mods.append(m)
            qs.append(attn.norm_q(heads(attn, _linear(attn.to_q, nh, lora))))
            ks.append(attn.norm_k(heads(attn, _linear(attn.to_k, nh, lora))))
            vs.append(heads(attn, _linear(attn.to_v, nh, lora)))
        mt = _adaln(blk.norm1_context, temb, True).chunk(6, dim=1)
        nt = blk.norm1_context.norm(txt) * (1 + mt[1][:, None]) + mt[0][:, None]
        tq = attn.norm_added_q(heads(attn, _linear(attn.add_q_proj, nt, True)))
        tk = attn.norm_added_k(heads(attn, _linear(attn.add_k_proj, nt, True)))
        tv = heads(attn, _linear(attn.add_v_proj, nt, True))
        out = attend(attn, torch.cat([tq, *qs], 1), torch.cat([tk, *ks], 1), torch.cat([tv, *vs], 1))
        o_t, o_x, o_c = out.split([n_t, n_x, n_c], dim=1)
        new = []
        for (h, _, lora), m, o in zip(segs, mods, [o_x, o_c], strict=True):
            h = h + m[2][:, None] * _linear(attn.to_out[0], o, lora)
            nh = blk.norm2(h) * (1 + m[4][:, None]) + m[3][:, None]
            ff = _linear(blk.ff.net[2], F.gelu(_linear(blk.ff.net[0].proj, nh, lora), approximate="tanh"), lora)
            new.append(h + m[5][:, None] * ff)
        x, c = new
        txt = txt + mt[2][:, None] * _linear(attn.to_add_out, o_t, True)
        ntx = blk.norm2_context(txt) * (1 + mt[4][:, None]) + mt[3][:, None]
        txt = txt + mt[5][:, None] * blk.ff_context(ntx)

    for blk in tr.single_transformer_blocks:
        attn = blk.attn
        segs = [(torch.cat([txt, x], 1), temb, t_lora), (c, ctemb, True)]
        gates, mlps, qs, ks, vs = [], [], [], [], []
        for h, e, lora in segs:
            shift, scale, gate = _adaln(blk.norm, e, lora).chunk(3, dim=1)
            nh = blk.norm.norm(h) * (1 + scale[:, None]) + shift[:, None]
            gates.append(gate)
            mlps.append(F.gelu(_linear(blk.proj_mlp, nh, lora), approximate="tanh"))
            qs.append(attn.norm_q(heads(attn, _linear(attn.to_q, nh, lora))))
            ks.append(attn.norm_k(heads(attn, _linear(attn.to_k, nh, lora))))
            vs.append(heads(attn, _linear(attn.to_v, nh, lora)))
        out = attend(attn, torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1))
        o_main, o_c = out.split([n_t + n_x, n_c], dim=1)
        new = []
        for (h, _, lora), gate, mlp, o in zip(segs, gates, mlps, [o_main, o_c], strict=True):
            new.append(h + gate[:, None] * _linear(blk.proj_out, torch.cat([o, mlp], 2), lora))
        txt, x = new[0].split([n_t, n_x], dim=1)
        c = new[1]

    x = tr.norm_out(x, temb)
    return _linear(tr.proj_out, x, True)


@pytest.mark.parametrize("attention", ["union", "causal"])
@pytest.mark.parametrize("lora_on_target", [False, True])
def test_matches_joint_sequence_reference(components, attention, lora_on_target):
    tr = _fresh_transformer(components)
    inputs, cond = _inputs()
    with torch.no_grad():
        ours = corrector_forward(tr, **inputs, **cond, attention=attention, lora_on_target=lora_on_target)
        ref = reference_forward(tr, inputs, cond, attention, lora_on_target)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("lora_on_target", [False, True])
def test_a_text_stream_lora_applies_to_every_token_as_the_reference_says(components, lora_on_target):
    tr = _fresh_transformer(components, target_modules="paper_and_text")
    assert hasattr(tr.transformer_blocks[0].attn.add_q_proj, "lora_A")  # peft wrapped the text stream
    inputs, cond = _inputs()
    with torch.no_grad():
        ours = corrector_forward(tr, **inputs, **cond, lora_on_target=lora_on_target)
        ref = reference_forward(tr, inputs, cond, "union", lora_on_target)
        no_condition = corrector_forward(tr, **inputs, lora_on_target=False)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(no_condition, components["transformer"](**inputs).sample)  # text LoRA acts


def test_equals_stock_forward_without_condition_or_lora(components):
    tr = components["transformer"]
    inputs, _ = _inputs()
    with torch.no_grad():
        stock = tr(**inputs).sample
        ours = corrector_forward(tr, **inputs)
    assert torch.equal(stock, ours)


def test_paper_lora_has_no_effect_without_condition(components):
    inputs, _ = _inputs()
    with torch.no_grad():
        stock = components["transformer"](**inputs).sample
        ours = corrector_forward(_fresh_transformer(components), **inputs, lora_on_target=False)
        on_target = corrector_forward(_fresh_transformer(components), **inputs, lora_on_target=True)
    assert torch.equal(stock, ours)
    assert not torch.allclose(stock, on_target)


@pytest.mark.parametrize("attention", ["union", "causal"])
def test_condition_changes_target_velocity(components, attention):
    tr = _fresh_transformer(components)
    inputs, cond = _inputs()
    other = dict(cond, cond_hidden_states=cond["cond_hidden_states"] + 1.0)
    with torch.no_grad():
        a = corrector_forward(tr, **inputs, **cond, attention=attention)
        b = corrector_forward(tr, **inputs, **other, attention=attention)
        none = corrector_forward(tr, **inputs, attention=attention)
    assert (a - b).abs().max() > 1e-3
    assert (a - none).abs().max() > 1e-3


def _condition_keys_of_last_block(tr, inputs, cond, attention):
    """Keys the last single block computes for the condition tokens (captured by a forward hook)."""
    n_cond = cond["cond_hidden_states"].shape[1]
    captured = []
    hook = tr.single_transformer_blocks[-1].attn.to_k.register_forward_hook(
        lambda mod, args, out: captured.append(out) if out.shape[1] == n_cond else None
    )
    with torch.no_grad():
        corrector_forward(tr, **inputs, **cond, attention=attention)
    hook.remove()
    assert len(captured) == 1
    return captured[0]


@pytest.mark.parametrize("attention,independent", [("causal", True), ("union", False)])
def test_condition_states_depend_on_target_only_in_union_mode(components, attention, independent):
    tr = _fresh_transformer(components)
    inputs, cond = _inputs()
    moved = dict(inputs, hidden_states=inputs["hidden_states"] * 0.5 + 1, timestep=inputs["timestep"] * 0.3)
    a = _condition_keys_of_last_block(tr, inputs, cond, attention)
    b = _condition_keys_of_last_block(tr, moved, cond, attention)
    assert torch.equal(a, b) == independent


def test_backward_reaches_lora_parameters_only(components):
    tr = _fresh_transformer(components).train()
    inputs, cond = _inputs()
    out = corrector_forward(tr, **inputs, **cond, attention="union", lora_on_target=False)
    out.square().mean().backward()
    lora = {n: p for n, p in tr.named_parameters() if "lora_" in n}
    untouched = {n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0}
    # The last block's condition output feeds nothing, so only its condition keys/values get gradients.
    assert untouched == set(dead_end_lora_parameters(tr)) != set()
    assert all(p.grad is None for n, p in tr.named_parameters() if n not in lora)


def test_gradient_checkpointing_gives_the_same_gradients(components):
    grads = []
    for checkpointing in (False, True):
        tr = _fresh_transformer(components).train()
        if checkpointing:
            tr.enable_gradient_checkpointing()
        inputs, cond = _inputs()
        corrector_forward(tr, **inputs, **cond, attention="causal").square().mean().backward()
        grads.append({n: p.grad for n, p in tr.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_kv_cached_causal_equals_uncached(components):
    tr = _fresh_transformer(components)
    inputs, cond = _inputs(batch=3)
    shared = dict(cond, cond_hidden_states=cond["cond_hidden_states"][:1].expand(3, -1, -1))
    with torch.no_grad():
        full = corrector_forward(tr, **inputs, **cond, attention="causal")
        cache = build_condition_cache(tr, **cond, pooled_projections=inputs["pooled_projections"])
        cached = corrector_forward(tr, **inputs, cond_cache=cache, attention="causal")
        # one cache row shared by three chains (same flawed image and prompt)
        shared_inputs = dict(inputs, pooled_projections=inputs["pooled_projections"][:1].expand(3, -1))
        full_shared = corrector_forward(tr, **shared_inputs, **shared, attention="causal")
        one = build_condition_cache(
            tr, cond_hidden_states=cond["cond_hidden_states"][:1], cond_ids=cond["cond_ids"],
            pooled_projections=inputs["pooled_projections"][:1],
        )
        cached_shared = corrector_forward(tr, **shared_inputs, cond_cache=one, attention="causal")
        selected = corrector_forward(tr, **inputs, cond_cache=cache.select([0, 1, 2]), attention="causal")
    assert (full - cached).abs().max() <= 1e-5
    assert (full_shared - cached_shared).abs().max() <= 1e-5
    assert torch.equal(selected, cached)


def test_pack_unpack_round_trip():
    latents = torch.randn(2, 16, 8, 6)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 12, 64)
    assert torch.equal(unpack_latents(tokens, 8, 6), latents)


def test_condition_ids_are_shifted_left_by_the_position_delta():
    ids = condition_ids(64)  # 8x8 latent -> 4x4 tokens, delta 4 columns
    assert ids.shape == (16, 3)
    assert ids[:, 0].eq(0).all()
    assert ids[:, 1].min() == 0 and ids[:, 1].max() == 3
    assert ids[:, 2].min() == -4 and ids[:, 2].max() == -1


def test_aligned_condition_ids_are_the_target_ids_and_unknown_positions_fail():
    assert torch.equal(condition_ids(64, position="aligned"), latent_ids(8, 8))
    with pytest.raises(ValueError, match="condition_position"):
        condition_ids(64, position="on top")


def test_bad_placement_or_attention_fails_before_any_model_is_loaded(tmp_path):
    from reflectionflow.models.module import ReflectionTuningModule
    from reflectionflow.search.generator import FluxGenerator

    missing = str(tmp_path / "no-model")
    with pytest.raises(ValueError, match="model.condition_position"):
        ReflectionTuningModule(path=missing, condition_position="on top")
    with pytest.raises(ValueError, match="model.attention"):
        ReflectionTuningModule(path=missing, attention="sideways")
    with pytest.raises(ValueError, match="generator.condition_position"):
        FluxGenerator(missing, condition_position="on top")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda i, c: (dict(i, img_ids=i["img_ids"][:-1]), c), "img_ids"),
        (lambda i, c: (dict(i, txt_ids=torch.zeros(3, 3)), c), "txt_ids"),
        (lambda i, c: (i, dict(c, cond_ids=None)), "cond_ids"),
        (lambda i, c: (i, dict(c, cond_ids=c["cond_ids"][:2])), "cond_ids"),
        (lambda i, c: (i, dict(c, cond_hidden_states=c["cond_hidden_states"][..., :32])), "cond_hidden_states"),
        (lambda i, c: (dict(i, hidden_states=i["hidden_states"][..., :60]), c), "hidden_states"),
        (lambda i, c: (dict(i, encoder_hidden_states=i["encoder_hidden_states"][..., :16]), c), "encoder_hidden_states"),
    ],
)
def test_bad_input_raises_value_error_naming_the_tensor(components, change, message):
    inputs, cond = change(*_inputs())
    with pytest.raises(ValueError, match=message) as err:
        corrector_forward(components["transformer"], **inputs, **cond)
    assert "shape" in str(err.value)


def test_unknown_attention_mode_is_rejected(components):
    inputs, cond = _inputs()
    with pytest.raises(ValueError, match="attention"):
        corrector_forward(components["transformer"], **inputs, **cond, attention="sparse")


def test_gradient_checkpointing_gives_the_same_gradients_through_the_shared_block_inputs(components):
    """Full fine-tuning: the timestep embedding reaches every block inside `SharedBlockInputs`, not as an
    explicit checkpoint argument; its gradients must survive recomputation too."""
    grads = []
    for checkpointing in (False, True):
        tr = _fresh_transformer(components, lora=False).train().requires_grad_(True)
        if checkpointing:
            tr.enable_gradient_checkpointing()
        inputs, cond = _inputs()
        corrector_forward(tr, **inputs, **cond, attention="union").square().mean().backward()
        grads.append({n: p.grad for n, p in tr.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(name.startswith("time_text_embed.") for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("attention", ["union", "causal"])
def test_set_attention_backend_reaches_every_attention_call(components, monkeypatch, attention):
    from diffusers.models import attention_dispatch

    from reflectionflow.models.corrector import attention as corrector_attention

    tr = _fresh_transformer(components)
    inputs, cond = _inputs()
    with torch.no_grad():
        default = corrector_forward(tr, **inputs, **cond, attention=attention)
    # set_attention_backend also sets diffusers' global active backend; monkeypatch restores it afterwards
    registry = attention_dispatch._AttentionBackendRegistry
    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)
    tr.set_attention_backend("_native_math")
    backends = []

    def recording(*args, backend=None, **kwargs):
        backends.append(backend)
        return attention_dispatch.dispatch_attention_fn(*args, backend=backend, **kwargs)

    monkeypatch.setattr(corrector_attention, "dispatch_attention_fn", recording)
    with torch.no_grad():
        ours = corrector_forward(tr, **inputs, **cond, attention=attention)
        if attention == "causal":
            build_condition_cache(tr, **cond, pooled_projections=inputs["pooled_projections"])
    n_blocks = len(tr.transformer_blocks) + len(tr.single_transformer_blocks)
    assert len(backends) >= n_blocks
    assert set(backends) == {"_native_math"}
    torch.testing.assert_close(ours, default, atol=1e-5, rtol=1e-4)
