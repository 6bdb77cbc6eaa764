"""Pure math of MoE upcycling: alpha schedules, router init, weight fusion. No I/O."""
