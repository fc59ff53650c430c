// swift-tools-version:6.0
import PackageDescription

let crypto: Target.Dependency = .product(name: "Crypto", package: "swift-crypto")

let package = Package(
    name: "Lifeboat",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "lifeboat", targets: ["lifeboat"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
    ],
    targets: [
        // System-library shims: the C world stays here.
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .systemLibrary(name: "CFuse", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        // libext2fs (Debian libext2fs-dev, LGPL-2): an I/O manager over Lifeboat's disk images and
        // accessors for what the headers only offer as macros.
        .target(name: "CExt2fs", linkerSettings: [.linkedLibrary("ext2fs"), .linkedLibrary("com_err")]),
        // Hash kernels BoringSSL lacks: SHA-256 of four chunks at once (SHA extensions), GMAC with VPCLMULQDQ.
        .target(name: "CHashing"),

        // Typed wrappers over the system calls every layer uses.
        .target(name: "SystemIO"),
        .target(name: "ObjectStore", dependencies: ["SystemIO"]),
        .target(name: "ChunkStore", dependencies: ["SystemIO", "ObjectStore", "CZstd", "CHashing", crypto]),
        .target(name: "Vault", dependencies: ["SystemIO", "ObjectStore", "ChunkStore", "CHashing", crypto]),
        .target(name: "VirtualDisk", dependencies: ["SystemIO", "ChunkStore", "Vault"]),
        .target(name: "GuestFiles", dependencies: ["SystemIO", "Vault", "VirtualDisk", "CExt2fs"]),
        .target(name: "Mount", dependencies: ["SystemIO", "Vault", "VirtualDisk", "GuestFiles", "CFuse"]),
        .target(name: "Sync", dependencies: ["SystemIO", "ChunkStore", "Vault", "VirtualDisk", crypto]),
        .executableTarget(
            name: "lifeboat",
            dependencies: ["SystemIO", "Vault", "VirtualDisk", "GuestFiles", "Mount", "Sync", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),

        // Helpers shared by the test targets: temporary directories, generated data, processes.
        .target(name: "TestSupport", dependencies: ["SystemIO", crypto], path: "Tests/TestSupport"),
        .testTarget(name: "SystemIOTests", dependencies: ["SystemIO"]),
        .testTarget(name: "ObjectStoreTests", dependencies: ["ObjectStore", "TestSupport"]),
        .testTarget(name: "ChunkStoreTests", dependencies: ["ChunkStore", "ObjectStore", "TestSupport"]),
        .testTarget(name: "VaultTests", dependencies: ["Vault", "ChunkStore", "ObjectStore", "TestSupport"], exclude: ["borg_prune_oracle.py"]),
        .testTarget(name: "VirtualDiskTests", dependencies: ["VirtualDisk", "Vault", "TestSupport"]),
        .testTarget(name: "GuestFilesTests", dependencies: ["GuestFiles", "VirtualDisk", "TestSupport"]),
        .testTarget(name: "MountTests", dependencies: ["Mount", "Vault", "VirtualDisk", "TestSupport"]),
        .testTarget(name: "SyncTests", dependencies: ["Sync", "Vault", "VirtualDisk", "CFuse", "TestSupport"]),
        // Runs the built `lifeboat` binary against real images, as an operator would.
        .testTarget(name: "lifeboatTests", dependencies: ["lifeboat", "TestSupport"]),
    ]
)
