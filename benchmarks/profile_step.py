"""Examples/s of default LoRA training steps on SST under variants, optionally with a torch.profiler table.

    python benchmarks/profile_step.py nodrop eager          # flags: fp32 nodrop nobbdrop bf16w eager profile
"""
import time, torch, sys
from peft_mtl.training.config import TrainConfig
from peft_mtl.training.train import build_model, load_task_data
from peft_mtl.data.loading import BatchStream
from peft_mtl.training.optimization import TrainingStep, build_optimizer, build_scheduler
from peft_mtl.training.regularizers import Objective
from peft_mtl.model.backbone import *
from peft_mtl.device import configure_threads
from pathlib import Path
configure_threads()
flags=sys.argv[1:]
prec="fp32" if "fp32" in flags else "bf16"
cfg=TrainConfig(tasks=["sst"], max_train_examples=2000, max_eval_examples=10, precision=prec)
cfg.lora.dropout=0.0 if "nodrop" in flags else 0.05
n,p=resolve_backbone(None); tok=load_tokenizer(p)
if "eager" in flags:
    from transformers import AutoModel
    enc=AutoModel.from_pretrained(str(p), attn_implementation="eager")
else: enc=load_encoder(p)
if "nobbdrop" in flags:
    for mod in enc.modules():
        if isinstance(mod, torch.nn.Dropout): mod.p=0.0
if "noattndrop" in flags:
    enc.config.attention_probs_dropout_prob=0.0
    for l in enc.encoder.layer: l.attention.self.dropout.p=0.0; l.attention.self.dropout_prob=0.0 if hasattr(l.attention.self,'dropout_prob') else None
if "bf16w" in flags: enc.to(torch.bfloat16)
tr,dev,sizes=load_task_data(cfg,tok,Path("../shared/data"))
m=build_model(cfg,enc,384); m.train()
opt=build_optimizer(cfg,m); sch=build_scheduler(opt,1000,0.06)
s={"sst":BatchStream(tr["sst"],32,0,0,0)}
step=TrainingStep(m,Objective(m,cfg,prec),opt,sch,cfg.max_grad_norm)
batch=lambda: {"sst": s["sst"].next()}
for i in range(3): step(batch())
if "profile" in flags:
    from torch.profiler import profile
    with profile(record_shapes=("shapes" in flags)) as prof:
        for i in range(5): step(batch())
    print(prof.key_averages(group_by_input_shape=("shapes" in flags)).table(sort_by="self_cpu_time_total", row_limit=25))
t=time.perf_counter(); N=20
for i in range(N): step(batch())
el=time.perf_counter()-t
print(flags, f"{N*32/el:.1f} ex/s")
