"""The end-to-end results as a printed table, the sparse / dense time ratios and the target lines."""
from __future__ import annotations


def _mib(value):
    return "-" if value is None else f"{value / 2**20:.0f}"


def _num(value, fmt=".2f", suffix=""):
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def print_table(results: dict, targets: list[dict], informational: list[dict]) -> None:
    env = results["environment"]
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  transformers {env['transformers']}"
          f"  flash-attn {env['flash_attn']}  {env['date']}")
    head = (f"{'case':44} {'prefill ms [p20, p80]':>26} {'seq/s':>8} {'speedup':>7} {'FLOPs x':>7} {'spd/FL':>6}"
            f" {'ms/step':>8} {'gen ms':>9} {'KV MiB':>7} {'peak MiB':>8} {'prune %':>7} {'vs auth':>7}")
    print(head)
    for cid, case in results["cases"].items():
        label = cid
        if case.get("error"):
            print(f"{label:44} {case['error']}")
            continue
        f = case["figures"]
        p = f["prefill_ms"]
        gen = f.get("generate_ms")
        print(f"{label:44} {p['median_ms']:9.2f} [{p['p20_ms']:7.2f}, {p['p80_ms']:7.2f}]"
              f" {f['prefill_seq_per_s']:8.2f} {_num(f.get('speedup_vs_dense'), '.2f'):>7}"
              f" {_num(f['flops']['ratio_exact'], '.2f'):>7} {_num(f.get('speedup_over_flops_ratio'), '.2f'):>6}"
              f" {_num(f.get('decode_ms_per_step'), '.2f'):>8} {_num(gen and gen['median_ms'], '.1f'):>9}"
              f" {_mib(f['kv_cache_bytes']):>7} {_mib(f['peak_mem_prefill_bytes']):>8}"
              f" {_num(f.get('prune_share') and 100 * f['prune_share'], '.1f'):>7}"
              f" {_num(f.get('speedup_vs_authors'), '.2f'):>7}")
    ratios = results.get("end_to_end_ratios", [])
    if ratios:
        kind = "CPU" if env["device_type"] == "cpu" else "GPU"
        print(f"\n{kind} end-to-end ratio, sparse / dense time (lower is faster):")
        for r in ratios:
            print(f"  {r['shape']} {r['attn']} batch {r['batch']:>2} {r['preset']:4} budget {r['budget']:>3}:"
                  f" prefill {r['prefill_ratio']:.3f}  generate {_num(r['generate_ratio'], '.3f')}")
    print("\nTargets (LLaVA-1.5-7B shapes, bf16, GPU):")
    for t in targets:
        who = " ".join(x for x in (t["attn"], t["preset"]) if x)
        print(f"  [{t['status']:>12}] {t['target']} [{who}]: {t['detail']}")
    if informational:
        print("Same checks on this run's shapes (informational, not the targets):")
        for t in informational:
            who = " ".join(x for x in (t["shape"], t["attn"], t["preset"]) if x)
            print(f"  [{t['status']:>12}] {t['target']} [{who}]: {t['detail']}")

