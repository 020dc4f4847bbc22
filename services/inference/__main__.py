"""Entry point: python -m services.inference"""

import asyncio

from services.common.runner import run_service
from services.inference.app import create_server
from services.inference.core import InferenceCore
from services.inference.settings import InferenceSettings

if __name__ == "__main__":
    asyncio.run(
        run_service(
            InferenceSettings(),
            create_server,
            warm_up=InferenceCore.start,
            close=InferenceCore.close,
        )
    )
