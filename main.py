"""`python main.py`: serve the model over an OpenAI-compatible HTTP API (the same as `medusa-gguf serve`).

    python main.py                       # 127.0.0.1:8000, settings from the environment (HOST, PORT, N_PARALLEL, ...)
    python main.py --port 9000 --parallel 2 --threads 4

`python main.py --help` lists the flags; each overrides the environment variable named beside it.
"""
import sys

from medusa_gguf.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
