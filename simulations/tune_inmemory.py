"""In-memory federated loop for fast hyper-parameter search (no Flower, same client code).

Every client trains every round with ``client.local.train_round`` in a 2-process pool; the
server side is ``common.updates.decode_mean_update``, i.e. what FedAvg + FedRecStrategy do,
minus Flower's messaging. Figures from it are for choosing settings; results reported as
federated runs come from ``fedrec simulate``.

    python -m simulations.tune_inmemory '{"learning-rate": 0.02, "batch-size": 32}' ROUNDS EVAL_EVERY

The JSON holds run-config overrides (MovieLens-100K at ../shared/datasets/ml-100k by
default); ``_slr`` sets the server learning rate, ``_adam`` a server Adam step size instead,
``eval-refit-epochs`` re-fits user rows before evaluating, ``_clients`` samples that many
clients per round (seeded), ``_decay`` multiplies the server
learning rate by that factor every round (from round ``_decay_from``), ``_mom`` adds server momentum (FedAvgM),
``_workers`` sets the size of the process pool (default 2), ``_sample_seed`` seeds the
client sampling (default: the run-config seed). Every run with the same ``_sample_seed``
samples the same clients in the same rounds, so its figures move together: three
``fedrec simulate`` runs (random sampling) of settings that read 0.626-0.634 here gave
0.597-0.608. Compare settings on several sampling seeds before trusting a gain.
``_clip`` C and ``_z`` z run user-level DP as the strategy does (clip on the device, weight
1, noise of std z*C on the sum, divided by the clients per round); no accounting here.
"""

import json
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch

from common.config import parse_run_config
from simulations.engine import fused_run_config
from common.federation import slicer_cached
from client.local import train_round, evaluate_client
from common.models import build_model
from common.updates import UpdateLayout, decode_mean_update
from common.metrics import merge_sums

OV = json.loads(sys.argv[1]); ROUNDS = int(sys.argv[2]); EVERY = int(sys.argv[3]) if len(sys.argv) > 3 else 5
base = {"dataset": "movielens-100k", "data-path": "../shared/datasets/ml-100k"}
base.update({k: v for k, v in OV.items() if not k.startswith("_")})
cfg = parse_run_config(fused_run_config(base))
torch.set_num_threads(1)
def init():
    global S; torch.set_num_threads(1); S = slicer_cached(cfg)
def fit(args):
    pid, shared, state, rnd = args
    r = train_round(cfg.model_config, cfg.train_config, S.client(pid), shared, state, seed=cfg.seed, server_round=rnd, rowwise=cfg.row_wise_aggregation, clipping_norm=OV.get("_clip"))
    return pid, r.upload, (1 if OV.get("_clip") else r.num_examples), r.local_state, r.metrics["train_loss"], r.metrics.get("update_norm_before_clipping", 0.0)
def ev(args):
    pid, shared, state = args
    return evaluate_client(cfg.model_config, S.client(pid), shared, state, seed=cfg.seed, refit=cfg.refit_config)
S = slicer_cached(cfg); n = len(S)
m = build_model(cfg.model_config, 0, S.prepared.num_items, seed=cfg.seed)
sh = m.shared_state(); layout = UpdateLayout.from_state(sh, m.item_row_parameter_names(), S.prepared.num_items)
shared = list(sh.values()); states = {}
slr = OV.get("_slr", cfg.server_learning_rate)
# optional server adam
mom = OV.get("_adam"); mt = vt = None
t0 = time.time()
per_round = OV.get("_clients", n); decay = OV.get("_decay", 1.0)
sampler = np.random.default_rng(OV.get("_sample_seed", cfg.seed))
with Pool(OV.get("_workers", 2), initializer=init) as pool:
    for rnd in range(1, ROUNDS + 1):
        chosen = sorted(sampler.choice(n, size=per_round, replace=False)) if per_round < n else range(n)
        res = pool.map(fit, [(p, shared, states.get(p), rnd) for p in chosen], chunksize=8)
        tot = sum(r[2] for r in res); mean = None
        for pid, up, ne, st, loss, _ in res:
            states[pid] = st; w = ne / tot
            mean = [u * w for u in up] if mean is None else [a + u * w for a, u in zip(mean, up)]
        if OV.get("_z"):
            noise = np.random.default_rng()
            mean = [(a * len(res) + noise.normal(0, OV["_z"] * OV["_clip"], a.shape)) / per_round for a in mean[:-1]] + [np.ones_like(mean[-1])]
        if mom:
            dec = decode_mean_update(layout, shared, mean, server_learning_rate=1.0)
            d = [a - b for a, b in zip(dec, shared)]
            b1, b2, eta, tau = 0.9, 0.99, mom, 1e-3
            mt = [b1 * x + (1 - b1) * y for x, y in zip(mt, d)] if mt else [(1 - b1) * y for y in d]
            vt = [b2 * x + (1 - b2) * y * y for x, y in zip(vt, d)] if vt else [(1 - b2) * y * y for y in d]
            shared = [x + eta * a / (np.sqrt(b) + tau) for x, a, b in zip(shared, mt, vt)]
        elif OV.get("_mom"):
            step = [a - b for a, b in zip(decode_mean_update(layout, shared, mean, server_learning_rate=1.0), shared)]
            vel = [OV["_mom"] * v + d for v, d in zip(vel, step)] if rnd > 1 else step
            shared = [x + slr * v for x, v in zip(shared, vel)]
        else:
            shared = decode_mean_update(layout, shared, mean, server_learning_rate=slr)
            if rnd >= OV.get("_decay_from", 0):
                slr *= decay
        if rnd % EVERY == 0 or rnd == ROUNDS:
            e = pool.map(ev, [(p, shared, states.get(p)) for p in range(n)], chunksize=32)
            parts = [{k[5:]: v for k, v in x.items() if k.startswith("test_")} for x in e]
            mm = merge_sums([p for p in parts if p.get("count", 0) > 0])
            print(f"r{rnd} loss {np.mean([r[4] for r in res]):.4f} norm {np.median([r[5] for r in res]):.3f} HR {mm['sampled_hr@10']:.4f} NDCG {mm['sampled_ndcg@10']:.4f} fullHR {mm['full_hr@10']:.4f} t {time.time()-t0:.0f}s", flush=True)
