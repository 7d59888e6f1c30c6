"""`python -m baaaht.services.sessions --config FILE`: the session manager as its own process."""

from baaaht.bus.runner import main
from baaaht.services.sessions.service import build

if __name__ == "__main__":
    main(build)
