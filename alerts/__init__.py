"""Alert rules as code and the chat notifier (see the live-observability issue)."""
