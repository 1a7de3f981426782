"""Merge the steps, test counts, bench rows and roofline of a scripts/gpu_check.sh run into
OUT/gpu_check.json and OUT/gpu_check.md.

    python scripts/gpu_check_report.py OUT TOTAL_SECONDS
"""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET


def main(out: str, total: int) -> int:

    steps = [json.loads(line) for line in open(f"{out}/steps.jsonl") if line.strip()]
    tests = {}
    for name in ("tests_cuda", "tests_triton_decode", "tests_attention"):
        path = f"{out}/{name}.xml"
        if os.path.exists(path):
            s = ET.parse(path).getroot()
            s = s if s.tag == "testsuite" else s[0]
            tests[name] = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            tests[name]["failed"] = [c.get("classname", "") + "::" + c.get("name", "") for c in s.iter("testcase")
                                     if c.find("failure") is not None or c.find("error") is not None][:30]
    bench = json.load(open(f"{out}/bench.json")) if os.path.exists(f"{out}/bench.json") else None
    roof = subprocess.run([sys.executable, "scripts/roofline.py", "--json"], capture_output=True, text=True)
    roofline = json.loads(roof.stdout) if roof.returncode == 0 else []
    compare = []
    if bench:
        for r in bench.get("rows", []):
            if r.get("suite") != "attention_with_kv_cache" or not r.get("ms"):
                continue
            for p in roofline:
                if (p["B"], p["L"], p["S"], p["Hkv"]) == (r.get("B"), r.get("L"), r.get("S"), r.get("Hkv")):
                    key = {"mqa.triton": "triton", "mqa.cuda": "cuda"}.get(r["provider"])
                    if key:
                        compare.append(dict(B=r["B"], L=r["L"], S=r["S"], Hkv=r["Hkv"], provider=r["provider"],
                                            measured_us=1e3 * r["ms"], measured_pct=r.get("pct_peak"),
                                            predicted_us=p[key]["pred_us"], predicted_pct=p[key]["pred_pct"]))
    report = dict(total_seconds=total, steps=steps, tests=tests, roofline_vs_measured=compare,
                  bench_environment=(bench or {}).get("environment"))
    json.dump(dict(report, bench=bench, roofline=roofline), open(f"{out}/gpu_check.json", "w"), indent=1)
    md = [f"# GPU check ({total} s)", "", "| step | rc | s |", "|---|---:|---:|"]
    md += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
    for name, t in tests.items():
        md += ["", f"**{name}**: {t['tests']} tests, {t['failures']} failures, {t['errors']} errors, {t['skipped']} skipped"]
        md += [f"- {f}" for f in t["failed"]]
    if compare:
        md += ["", "| B | L | S | Hkv | provider | measured µs | measured % | predicted µs | predicted % |",
               "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
        md += [f"| {c['B']} | {c['L']} | {c['S']} | {c['Hkv']} | {c['provider']} | {c['measured_us']:.2f} | "
               f"{c['measured_pct'] or 0:.0f}% | {c['predicted_us']:.2f} | {c['predicted_pct']:.0f}% |" for c in compare]
    if os.path.exists(f"{out}/bench.md"):
        md += ["", open(f"{out}/bench.md").read()]
    open(f"{out}/gpu_check.md", "w").write("\n".join(md) + "\n")
    print(f"wrote {out}/gpu_check.json and {out}/gpu_check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
