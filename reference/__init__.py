"""Reference clients of the system: agents that play the reference environments and record their
episodes (:mod:`reference.live_agent`, ``oel agents run / serve``) and the load generator
(:mod:`reference.loadgen`, ``oel loadgen``). They use the agent SDK (:mod:`producers`) as any agent would."""
