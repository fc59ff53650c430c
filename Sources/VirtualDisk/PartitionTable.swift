/// A partition of a disk, from its MBR or GPT.
public struct Partition: Sendable, Equatable {
    public enum Scheme: String, Sendable, Codable { case mbr, gpt }

    /// 1-based, as Linux numbers them (MBR logical partitions from 5).
    public var number: Int
    public var scheme: Scheme
    /// Byte offset and length on the disk.
    public var start: UInt64
    public var size: UInt64
    /// MBR: the type byte in hex ("83"); GPT: the type GUID ("0FC63DAF-8483-4772-8E79-3D69D8477DE4").
    public var type: String
    /// GPT partition name, if any.
    public var name: String?

    public init(number: Int, scheme: Scheme, start: UInt64, size: UInt64, type: String, name: String? = nil) {
        self.number = number
        self.scheme = scheme
        self.start = start
        self.size = size
        self.type = type
        self.name = name
    }
}
