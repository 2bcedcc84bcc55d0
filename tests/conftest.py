import torch

# Two cores on CI: keep torch from oversubscribing them when pytest-xdist runs two workers.
torch.set_num_threads(1)
