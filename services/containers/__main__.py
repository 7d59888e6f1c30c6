"""`python -m baaaht.services.containers --config FILE`: the container manager as its own process."""

from baaaht.bus.runner import main
from baaaht.services.containers.service import ContainerService

if __name__ == "__main__":
    main(ContainerService)
