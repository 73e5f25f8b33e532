"""Train Medusa heads for a GGUF model (the founding document's entry point; same as `medusa-gguf train`).

    python model/train_medusa.py --base_model_path models/vicuna-7b-v1.3.Q4_K_M.gguf --dataset_name wikitext \
        --dataset_config wikitext-103-raw-v1 --dataset_split 'train[:10%]' --output_dir medusa_heads_weights \
        --batch_size 8 --learning_rate 1e-4 --epochs 3

Run `python model/train_medusa.py --help` for every option.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from medusa_gguf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
