//! The agent daemon. (Owned by the agent work.)
