"""The settings under the founding document's names, e.g. `config.MEDUSA_WEIGHTS_PATH`.

Values come from the environment through `medusa_gguf.settings.Settings`, which validates them; the
defaults live there, once.
"""
from medusa_gguf.settings import Settings

SETTINGS = Settings.from_env()

BASE_MODEL_PATH = str(SETTINGS.base_model_path) if SETTINGS.base_model_path else None  # None: embedded model
MEDUSA_WEIGHTS_PATH = str(SETTINGS.medusa_weights_path)
N_GPU_LAYERS = SETTINGS.n_gpu_layers
N_THREADS = SETTINGS.n_threads
USE_MLOCK = SETTINGS.use_mlock
USE_MMAP = SETTINGS.use_mmap
N_CTX = SETTINGS.n_ctx
MAX_TOKENS_PER_STEP = SETTINGS.max_tokens_per_step
HOST = SETTINGS.host
PORT = SETTINGS.port
TREE = SETTINGS.tree
N_PARALLEL = SETTINGS.n_parallel
MAX_QUEUE = SETTINGS.max_queue
API_KEY = SETTINGS.api_key
