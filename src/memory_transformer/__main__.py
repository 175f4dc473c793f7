import sys

from memory_transformer.cli import main

sys.exit(main())
