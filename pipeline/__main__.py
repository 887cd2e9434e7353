import sys

from pipeline.orchestration.entry import main

sys.exit(main())
