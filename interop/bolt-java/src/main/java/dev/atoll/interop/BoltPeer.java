package dev.atoll.interop;

import com.alipay.remoting.BizContext;
import com.alipay.remoting.CustomSerializerManager;
import com.alipay.remoting.DefaultCustomSerializer;
import com.alipay.remoting.InvokeContext;
import com.alipay.remoting.exception.DeserializationException;
import com.alipay.remoting.exception.SerializationException;
import com.alipay.remoting.rpc.RequestCommand;
import com.alipay.remoting.rpc.RpcClient;
import com.alipay.remoting.rpc.RpcServer;
import com.alipay.remoting.rpc.protocol.RpcRequestCommand;
import com.alipay.remoting.rpc.protocol.SyncUserProcessor;

import java.io.ByteArrayOutputStream;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.TreeMap;

/**
 * A Bolt peer for Atoll's interop test, using the real SOFA Bolt library.
 *
 * <pre>
 * server PORT NAME          answers each String request with "NAME|request|headers"
 * client ADDRESS COUNT K=V  sends COUNT requests with the header map K=V...,
 *                           prints one line per call: "ok ANSWER" or "error CLASS: MESSAGE"
 * </pre>
 *
 * Headers travel as SOFARPC's string map (each key and value a 32-bit
 * length and UTF-8 bytes), the form Atoll reads.
 */
public final class BoltPeer {
    private static final String HEADERS = "atoll.headers";

    /** Writes and reads the header map of String requests. */
    static final class MapHeaders extends DefaultCustomSerializer {
        @Override
        public <T extends RequestCommand> boolean serializeHeader(T request, InvokeContext context)
                throws SerializationException {
            Map<String, String> headers = context == null ? null : context.get(HEADERS);
            if (headers == null || headers.isEmpty()) {
                return false;
            }
            ByteArrayOutputStream out = new ByteArrayOutputStream();
            for (Map.Entry<String, String> entry : headers.entrySet()) {
                write(out, entry.getKey());
                write(out, entry.getValue());
            }
            request.setHeader(out.toByteArray());
            return true;
        }

        @Override
        public <T extends RequestCommand> boolean deserializeHeader(T request)
                throws DeserializationException {
            byte[] bytes = request.getHeader();
            Map<String, String> headers = new TreeMap<>();
            if (bytes != null) {
                ByteBuffer in = ByteBuffer.wrap(bytes);
                while (in.remaining() > 0) {
                    headers.put(read(in), read(in));
                }
            }
            ((RpcRequestCommand) request).setRequestHeader(headers);
            return true;
        }

        private static void write(ByteArrayOutputStream out, String text) {
            byte[] bytes = text.getBytes(StandardCharsets.UTF_8);
            out.writeBytes(ByteBuffer.allocate(4).putInt(bytes.length).array());
            out.writeBytes(bytes);
        }

        private static String read(ByteBuffer in) {
            int length = in.getInt();
            byte[] bytes = new byte[Math.max(length, 0)];
            in.get(bytes);
            return new String(bytes, StandardCharsets.UTF_8);
        }
    }

    public static void main(String[] args) throws Exception {
        CustomSerializerManager.registerCustomSerializer(String.class.getName(), new MapHeaders());
        if (args.length >= 3 && args[0].equals("server")) {
            serve(Integer.parseInt(args[1]), args[2]);
        } else if (args.length >= 3 && args[0].equals("client")) {
            call(args);
        } else {
            System.err.println("usage: server PORT NAME | client ADDRESS COUNT [K=V...]");
            System.exit(2);
        }
    }

    private static void serve(int port, String name) throws InterruptedException {
        RpcServer server = new RpcServer(port, true);
        server.registerUserProcessor(new SyncUserProcessor<String>() {
            @Override
            public Object handleRequest(BizContext context, String request) {
                Object headers = context.getInvokeContext() == null
                        ? null : context.getInvokeContext().get(HEADERS);
                return name + "|" + request + "|" + (headers == null ? "" : headers);
            }

            @Override
            public String interest() {
                return String.class.getName();
            }
        });
        server.startup();
        System.out.println("listening " + port);
        System.out.flush();
        Thread.currentThread().join();
    }

    private static void call(String[] args) throws Exception {
        Map<String, String> headers = new LinkedHashMap<>();
        for (int i = 3; i < args.length; i++) {
            String[] pair = args[i].split("=", 2);
            headers.put(pair[0], pair.length > 1 ? pair[1] : "");
        }
        RpcClient client = new RpcClient();
        client.startup();
        int count = Integer.parseInt(args[2]);
        for (int i = 0; i < count; i++) {
            InvokeContext context = new InvokeContext();
            context.put(HEADERS, headers);
            try {
                Object answer = client.invokeSync(args[1], "call-" + i, context, 5000);
                System.out.println("ok " + answer);
            } catch (Exception e) {
                System.out.println("error " + e.getClass().getSimpleName() + ": " + e.getMessage());
            }
            System.out.flush();
        }
        client.shutdown();
    }
}
