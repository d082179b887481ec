"""Elastic DiLoCo failure drill on CPU (docs/experiments/elastic_diloco.md).

Two runs of 3 slices on the toy regression task, each with torchft's
Lighthouse (launch/elastic_local.py): an uninterrupted one, and one where
slice 2 is killed with SIGKILL at inner step --kill_at[0] and again at
--kill_at[1] (counted from its start or heal), restarted by the launcher each
time (it heals from a live slice). Writes OUT/{clean,drill}/slice*.jsonl,
OUT/summary.json and OUT/elastic_diloco.png (held-out loss of θ̃ against the
step, both runs; the kills marked).

  python tools/run_elastic_diloco.py --out=runs/elastic_diloco
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))
from elastic_local import run_elastic  # pylint: disable=g-import-not-at-top,wrong-import-position
from local import free_port, process_env  # pylint: disable=g-import-not-at-top,wrong-import-position


def records(out: str, s: int) -> list[dict]:
  path = os.path.join(out, f"slice{s}.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def run(out: str, args: list[str], kills: list[int], log) -> dict:
  os.makedirs(out, exist_ok=True)
  env = process_env(os.environ, 0, 1, 0, 1)
  port = free_port()
  result = {}
  thread = threading.Thread(target=lambda: result.setdefault("status", run_elastic(
      3, [f"--out_dir={out}", *args], env, port, restarts=len(kills), timeout=600,
      out=log)))
  start = time.time()
  thread.start()
  killed = []
  for k in kills:
    while thread.is_alive():  # wait for slice 2's k-th step in its current life
      recs = records(out, 2)
      pids = [r["pid"] for r in recs if r["event"] == "started"]
      mine = [r for r in recs if pids and r["pid"] == pids[-1] and r["event"] == "step"]
      if mine and pids[-1] not in [p for p, _ in killed]:
        first = mine[0]["step"]
        if mine[-1]["step"] >= first + k - 1:
          os.kill(pids[-1], signal.SIGKILL)
          killed.append((pids[-1], mine[-1]["step"]))
          break
      time.sleep(0.02)
  thread.join()
  return {"status": result.get("status"), "seconds": time.time() - start,
          "killed_at": [s for _, s in killed]}


def summarize(out: str, info: dict) -> dict:
  per = {}
  for s in range(3):
    recs = records(out, s)
    syncs = [r for r in recs if r["event"] == "sync"]
    done = [r for r in recs if r["event"] == "done"]
    per[s] = {
        "heals": [{"step": r["step"], "wait_s": round(r["wait_s"], 3)}
                  for r in recs if r["event"] == "heal"],
        "syncs": len(syncs),
        "syncs_without_slice2": sum(r["members"] == [0, 1] for r in syncs),
        "max_wait_s": round(max(r["wait_s"] for r in syncs), 3) if syncs else None,
        "waits_over_0.5s": [(r["step"], round(r["wait_s"], 3)) for r in syncs
                            if r["wait_s"] > 0.5],
        "bytes": [r["bytes"] for r in done],
        "final_outer": done[-1]["outer"] if done else None}
  evals = {r["step"]: r["eval_loss"] for r in records(out, 0) if "eval_loss" in r}
  return {**info, "slices": per, "eval_loss": evals}


def plot(summary: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, style in (("clean", "-"), ("drill", "--")):
    ev = summary[name]["eval_loss"]
    steps = sorted(ev)
    ax.plot(steps, [ev[t] for t in steps], style,
            label={"clean": "uninterrupted", "drill": "slice 2 killed twice"}[name])
  for k in summary["drill"]["killed_at"]:
    ax.axvline(k, color="red", alpha=0.4)
  for h in summary["drill"]["slices"][2]["heals"]:
    ax.axvline(h["step"], color="green", alpha=0.4)
  ax.set_xlabel("inner step")
  ax.set_ylabel("held-out MSE of θ̃ (slice 0)")
  ax.set_yscale("log")
  ax.set_title("Elastic Streaming DiLoCo, 3 slices (red: kill -9, green: heal)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/elastic_diloco")
  p.add_argument("--steps", type=int, default=240)
  p.add_argument("--kill_at", type=int, nargs=2, default=(40, 60))
  p.add_argument("--plot", default=None, help="PNG path (default OUT/elastic_diloco.png)")
  a = p.parse_args()
  args = [f"--steps={a.steps}", "--sync_every=8", "--num_fragments=2", "--overlap=1",
          "--step_sleep=0.03", "--inner_lr=3e-3"]
  summary = {}
  with open(os.path.join(a.out, "launch.log") if os.makedirs(a.out, exist_ok=True)
            is None else os.devnull, "w") as log:
    for name, kills in (("clean", []), ("drill", list(a.kill_at))):
      info = run(os.path.join(a.out, name), args, kills, log)
      summary[name] = summarize(os.path.join(a.out, name), info)
  summary["args"] = args
  with open(os.path.join(a.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot(summary, a.plot or os.path.join(a.out, "elastic_diloco.png"))
  print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "eval_loss"}
                    for k, v in summary.items() if k != "args"}, indent=1))
  return 0 if all(summary[n]["status"] == 0 for n in ("clean", "drill")) else 1


if __name__ == "__main__":
  sys.exit(main())
