"""Ray actor roles. Each class is plain Python; `ray.remote(Cls)` is applied where groups are created."""
