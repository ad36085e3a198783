# Sourced by the benchmarks that set our paper-preset federation against bare Flower
# (bench/federation_tls.sh, bench/sim_paper.sh), with HERE set to the bench folder:
#   BASELINE  the reference script ../shared/bench/$1 (or the BASELINE given)
#   PARAMS    the paper preset's float parameters, counted on the meta device (nothing built)
#   WORK      a fresh folder, the data cache inside it; telemetry off
BASELINE=${BASELINE:-$HERE/../../shared/bench/$1}
[ -f "$BASELINE" ] || BASELINE=/work/shared/bench/$1
WORK=$(mktemp -d); export FLWR_TELEMETRY_ENABLED=0 EGCMF_CACHE="$WORK/cache"
PARAMS=$(python -c "
import torch
from egcmf_model.config import load_config
from egcmf_model.engine import build_model
with torch.device('meta'):
    m = build_model(load_config('paper').model, ('a', 'b', 'c'))
print(sum(v.numel() for v in m.state_dict().values() if v.is_floating_point()))")
