"""Entry point: python -m services.experiments"""

import asyncio

from services.common.runner import run_service
from services.experiments.app import create_server
from services.experiments.settings import ExperimentsSettings

if __name__ == "__main__":
    asyncio.run(run_service(ExperimentsSettings(), create_server))
