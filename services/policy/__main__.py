"""`python -m baaaht.services.policy --config FILE`: the policy engine service process."""

from baaaht.bus.runner import main
from baaaht.services.policy.service import PolicyService

if __name__ == "__main__":
    main(PolicyService)
