"""Print the architecture matrix as a table: each tiny family (tests/families.py) against the exact
checks of tests/unit/test_architectures.py, with the measured numbers (run from the repository root:
.venv/bin/python scripts/architecture_matrix.py; ~1 min on 2 cores)."""
import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import headscope as hs
from tests.families import FAMILIES, tiny_family_model
from tests.unit.test_architectures import TOKENS, HEADS, uniform_deviation, logits
from headscope.engine.heads import hook_name
from headscope.engine.unembed import attention_bias_contribution, head_contributions, logits_from_residual
print("| family | restore (max diff, 4 ablations) | uniform dev (clean → ablated) | scan − naive (zero/uniform) | zero vs o_proj slice | heads+bias vs attn_out (rel) | rebuilt logits (rel) |")
print("|---|---|---|---|---|---|---|")
for fam in FAMILIES:
    m = tiny_family_model(fam)
    before = logits(m); restore = 0.0
    for method in ("zero","mean","resample","uniform"):
        with hs.ablate(m, HEADS, method=method, reference=TOKENS.flip(0)): logits(m)
        restore = max(restore, float((logits(m)-before).abs().max()))
    pats = [hook_name(l,"pattern") for l in range(2)]
    _, c = m.run_with_cache(TOKENS, names_filter=pats)
    with hs.ablate(m, HEADS, method="uniform"): _, a = m.run_with_cache(TOKENS, names_filter=pats)
    heads = [hs.Head.parse(h) for h in HEADS]
    dc = min(uniform_deviation(c[pats[h.layer]][:, h.head]) for h in heads); da = max(uniform_deviation(a[pats[h.layer]][:, h.head]) for h in heads)
    metric = lambda v, ch: v[:, -1, 5] - v[:, -1, 7]
    sd = max(float((hs.ablation_scan(m, TOKENS, metric, method=k, progress=False).values - hs.naive_ablation_scan(m, TOKENS, metric, method=k, progress=False).values).abs().max()) for k in ("zero","uniform"))
    o = m.blocks[1].attn.o.original_component; d = m.cfg.d_head
    def zs(mod, args):
        x = args[0].clone(); x[..., 2*d:3*d] = 0; return (x,)
    h = o.register_forward_pre_hook(zs)
    try: hand = logits(m)
    finally: h.remove()
    with hs.ablate(m, ["L1H2"], method="zero"): ab = logits(m)
    od = float((ab-hand).abs().max())
    real, cache = m.run_with_cache(TOKENS)
    r = cache["hook_embed"].float() + (cache["hook_pos_embed"].float() if "hook_pos_embed" in cache else 0)
    att = 0.0
    for l in range(2):
        at = head_contributions(m, cache, l).sum(2) + attention_bias_contribution(m, cache, l)
        act = cache[f"blocks.{l}.hook_attn_out"].float(); att = max(att, float((at-act).abs().max()/act.abs().max()))
        r = r + at + cache[f"blocks.{l}.hook_mlp_out"].float()
    rb = logits_from_residual(m, r, cache["ln_final.hook_scale"]); rl = float((rb-real).abs().max()/real.abs().max())
    print(f"| {fam} | {restore:.0f} | {dc:.2f} → {da:.1e} | {sd:.1e} | {od:.1e} | {att:.1e} | {rl:.1e} |")
