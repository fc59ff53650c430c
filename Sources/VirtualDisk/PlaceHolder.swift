public enum VirtualDiskPlaceholder {}
