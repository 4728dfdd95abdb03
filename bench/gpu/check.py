"""GPU check on the lent device: a worker serving its GPU over ggml RPC, a split over a
CPU worker and a GPU worker, and greedy equality with the same layout in one process."""
import json, os, subprocess, sys, time
sys.path.insert(0, os.getcwd())
from appliance.common import ggml
out = {}
devs = ggml.local_devices()
out["devices"] = [d.to_dict() for d in devs]
gpu = ggml.serving_device_indices(devs, "auto")[0]
cpu = ggml.serving_device_indices(devs, "cpu")[0]
out["auto_serves"] = devs[gpu].name
out["speed_gflops"] = {"gpu": ggml.measure_speed(device_index=gpu, n_threads=1),
                       "cpu_16t": ggml.measure_speed(device_index=cpu, n_threads=16)}
print(json.dumps(out, indent=1), flush=True)
servers = [subprocess.Popen([sys.executable, "-m", "appliance.worker.rpc_server", "--endpoint", ep, "--device", dev, "--threads", "8"],
                            stdout=open(f"/tmp/rpc-{dev}.log", "w"), stderr=subprocess.STDOUT)
           for ep, dev in (("127.0.0.1:50052", "cpu"), ("127.0.0.1:50053", "gpu"))]
time.sleep(4)
M = os.environ.get("GPU_CHECK_MODEL", ".gpu/tiny4.gguf")
prompts = ["Once upon a time", "The capital of France is", "def add(a, b):"]
def gen(kind):
    code = f"""
import sys, json; sys.path.insert(0, '.')
from llama_cpp import Llama, _logger; _logger.set_verbose(False)
from appliance.common import ggml
kind = {kind!r}
if kind == 'split':
    ggml.register_rpc_servers(['127.0.0.1:50052', '127.0.0.1:50053'])
    llm = Llama({M!r}, n_ctx=1024, n_gpu_layers=-1, tensor_split=[2.0, 3.0], verbose=False)
else:
    llm = Llama({M!r}, n_ctx=1024, n_gpu_layers=3, verbose=False)  # layers 0-1 CPU, 2-3 + output CUDA
res = [llm.create_completion(p, max_tokens=32, temperature=0, repeat_penalty=1.0)['choices'][0]['text'] for p in {prompts!r}]
print(json.dumps(res))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if r.returncode:
        return {"error": r.stderr[-1500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])
out["one_process"] = gen("local")
out["split_cpu_worker_then_gpu_worker"] = gen("split")
out["identical"] = out["one_process"] == out["split_cpu_worker_then_gpu_worker"]
for s in servers:
    s.kill()
out["rpc_logs"] = {d: open(f"/tmp/rpc-{d}.log").read()[-600:] for d in ("cpu", "gpu")}
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu.json"), "w"), indent=1)
