'''The code blocks of the seed project's README (DP-Flash-Attention), RECONSTRUCTED.

The original README is not available. These blocks were written from what issue 8 names
(every API, signature and command line it lists), as a seed user would have written them,
with shapes reduced so that they run in seconds on a CPU. ``BLOCKS`` maps a name to
(the block as the seed wrote it, the block after the migration table's change or None,
what is expected of the block as written: "works" or "error: <text of the error>").
tests/test_seed_examples.py runs every block and checks its results.
'''

QUICKSTART = """
import torch
from dp_flash_attention import DPFlashAttention

attn = DPFlashAttention(embed_dim=64, num_heads=4, epsilon=1.0, delta=1e-5, max_grad_norm=1.0)
Q = torch.randn(2, 16, 64)
K = torch.randn(2, 24, 64)
V = torch.randn(2, 24, 64)
output, privacy_stats = attn(Q, K, V, return_privacy_stats=True)
print(f"Privacy spent: epsilon={privacy_stats.epsilon_spent:.2f}")
"""

POSITIONAL = """
import torch
import dp_flash_attention

attn = dp_flash_attention.DPFlashAttention(64, 4, 1.0, 1e-5, 1.0)
x = torch.randn(2, 16, 64)
output, privacy_stats = attn(x, x, x, return_privacy_stats=True)
"""

FUNCTIONAL = """
import torch
from dp_flash_attention import dp_flash_attn_func

q = torch.randn(2, 32, 4, 16)
k = torch.randn(2, 32, 4, 16)
v = torch.randn(2, 32, 4, 16)
out = dp_flash_attn_func(q, k, v, causal=True, epsilon=1.0, delta=1e-5)
"""

HEAD_EPSILONS = """
import torch
from dp_flash_attention import DPFlashAttention

attn = DPFlashAttention(64, 4, 1.0, 1e-5, 1.0, head_epsilons=[0.1, 0.2, 0.3, 0.4])
x = torch.randn(2, 16, 64)
output, privacy_stats = attn(x, x, x, return_privacy_stats=True)
"""

IMPORTANCE = """
import torch
from dp_flash_attention import DPFlashAttention

attn = DPFlashAttention(64, 4, 1.0, 1e-5, 1.0, strategy="importance_based")
x = torch.randn(2, 16, 64)
output, privacy_stats = attn(x, x, x, return_privacy_stats=True)
"""
IMPORTANCE_MIGRATED = IMPORTANCE.replace('strategy="importance_based")',
                                         'strategy="importance_based", head_weights=[4, 3, 2, 1])')

CUSTOM_MECHANISM = """
import torch
from dp_flash_attention import DPFlashAttention
from dp_flash_attention.mechanisms import DPMechanism

class LaplacianAttention(DPMechanism):
    def add_noise(self, tensor, sensitivity, epsilon):
        scale = sensitivity / epsilon
        noise = torch.distributions.Laplace(0.0, scale).sample(tensor.shape)
        return tensor + noise

attn = DPFlashAttention(64, 4, 1.0, 1e-5, 1.0, noise_mechanism=LaplacianAttention())
x = torch.randn(2, 16, 64)
output, privacy_stats = attn(x, x, x, return_privacy_stats=True)
"""
CUSTOM_MECHANISM_MIGRATED = CUSTOM_MECHANISM.replace(
    "class LaplacianAttention(DPMechanism):\n",
    "class LaplacianAttention(DPMechanism):\n    sensitivity_norm = \"l1\"\n")

MAKE_PRIVATE = """
import torch
from torch import nn
from dp_flash_attention import make_model_differentially_private

model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
private = make_model_differentially_private(model, target_epsilon=3.0, target_delta=1e-5, num_epochs=1,
                                            batch_size=32)
"""
MAKE_PRIVATE_MIGRATED = MAKE_PRIVATE.replace(
    "batch_size=32)",
    "batch_size=32,\n    dataset=torch.utils.data.TensorDataset(torch.randn(256, 8), torch.randint(0, 2, (256,))))")

UTILITIES = """
import dp_flash_attention

version = dp_flash_attention.cuda_version()
"""

RENYI = """
from dp_flash_attention.privacy import RenyiAccountant

accountant = RenyiAccountant()
for step in range(100):
    accountant.add_step(epsilon=0.1, delta=1e-6, sampling_rate=0.01)
total_epsilon = accountant.get_epsilon(delta=1e-5)
"""

AMPLIFICATION = """
from dp_flash_attention.amplification import SubsamplingAmplification

amp = SubsamplingAmplification(base_epsilon=1.0, sampling_rate=0.01, num_steps=1000)
epsilon = amp.compute_epsilon(delta=1e-5)
"""

LORA = """
import torch
from torch import nn
from dp_flash_attention.finetune import DPLoRA

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = nn.Linear(16, 16)
    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x)

model = DPLoRA(Tiny(), rank=4, target_modules=["q_proj", "v_proj"])
"""

CALIBRATION = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from dp_flash_attention.calibration import AdaptiveNoiseCalibrator

model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
train_loader = DataLoader(TensorDataset(torch.randn(512, 8), torch.randint(0, 2, (512,))), batch_size=64)
calibrator = AdaptiveNoiseCalibrator(target_epsilon=3.0, target_delta=1e-5, confidence_interval=0.95)
noise_multiplier, max_grad_norm = calibrator.calibrate(model, train_loader)
"""

CHECKPOINTED = """
import torch
from dp_flash_attention import DPCheckpointedAttention

attn = DPCheckpointedAttention(64, 4, 1.0, 1e-5, 1.0, checkpoint_gradients=True, segments=4)
x = torch.randn(8, 16, 64, requires_grad=True)
output, privacy_stats = attn(x, x, x, return_privacy_stats=True)
output.sum().backward()
"""

#: the seed's command lines (``dpfa`` is the command; the seed's was the same)
COMMANDS = {
    "bench_speed": "dpfa bench speed --model bert-large --batch-size 32 --seq-length 512 --epsilon 1.0",
    "bench_memory": "dpfa bench memory --model gpt2-xl --compare-with flash,standard,opacus",
    "audit": "dpfa audit --attack membership_inference --num-shadow-models 100 --epsilon 1.0",
    "verify": "dpfa verify --mechanism renyi_gaussian --composition sequential",
}

BLOCKS = {
    "quickstart": (QUICKSTART, None, "works"),
    "positional": (POSITIONAL, None, "works"),
    "functional": (FUNCTIONAL, None, "works"),
    "head_epsilons": (HEAD_EPSILONS, None, "works"),
    "importance": (IMPORTANCE, IMPORTANCE_MIGRATED, "error: needs head_weights"),
    "custom_mechanism": (CUSTOM_MECHANISM, CUSTOM_MECHANISM_MIGRATED, "error: declare it in the class"),
    "make_private": (MAKE_PRIVATE, MAKE_PRIVATE_MIGRATED, "error: needs dataset="),
    "utilities": (UTILITIES, None, "works"),
    "renyi": (RENYI, None, "works"),
    "amplification": (AMPLIFICATION, None, "works"),
    "lora": (LORA, None, "works"),
    "calibration": (CALIBRATION, None, "works"),
    "checkpointed": (CHECKPOINTED, None, "works"),
}
